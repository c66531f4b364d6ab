"""Pooled (centralised) training: one model trained on the union of the clients'
training sets, the non-federated reference. Each round it makes the same number of
sample visits as a federated round: E epochs over the union (= sum_k E n_k), or
K * tau steps when --local-steps tau is set. Nothing is communicated.

The model is evaluated on every client's test set and on the pooled test set.
Deviations: the union is shuffled as one set (no per-client structure), as in the paper
baselines; client sampling (--fraction) does not apply: every client's data is used.
"""
import numpy as np

from fedmed import Algorithm, ClientState, register


@register("pooled")
class Pooled(Algorithm):
    Args = None
    primary_view = "centralised"
    faults_apply = False              # one centralised model: no site sends anything
    crosses_sites = "it trains one model on the union of every client's training images"
    pooled_kinds = {"centralised": "one model trained on the union of the clients' training "
                                   "sets, on every client's test set, joined"}

    def _private_keys(self, affine, stats):
        return set(self.init_weights)

    def setup(self, server, clients):
        super().setup(server, clients)
        for c in clients:
            c.state.clear()                           # clients hold nothing
        server.state["private"] = {k: v.clone() for k, v in self.init_weights.items()}

    def participants(self, server, sampled):
        union = np.concatenate([c.train for c in self.clients])
        return [ClientState("pooled", "pooled", np.sort(union), np.zeros(0, np.int64),
                            state=server.state)]

    def broadcast(self, server, client):
        return {}

    def export_models(self, server, clients):
        return {"model": {k: v.clone() for k, v in server.state["private"].items()}}

    def local_update(self, client, payload):
        self.load_model({}, client.state["private"])
        self.train(client, payload, steps_scale=len(self.clients))
        client.state["private"] = {k: v.detach().cpu().clone()
                                   for k, v in self.model.state_dict().items()}
        return {}

    def predict(self, server, client, idx):
        self.load_model({}, server.state["private"])
        return self.forward_probs(idx)
