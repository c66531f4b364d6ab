"""Local-only training: each client trains its own model from the common initialisation
on its own data with the same budget as the federated methods (E epochs or tau steps a
round), and nothing is communicated (the byte counters read 0).

Every tensor is private (the client keeps its whole model between rounds); client k is
evaluated with its own model on its own test set (view "local"), and the pooled test line
concatenates those predictions. A held-out client is evaluated with the n_k-weighted
average of the clients' models (an evaluation-only rule). In the last round every
client's model is also evaluated on every client's test set and on the pooled test set
(views "model:NAME"), as baselines.md asks of the local-only reference.
Deviations: none; this is the standard reference point (see ../shared/methods/baselines.md).
"""
from fedmed import Algorithm, register


@register("local")
class Local(Algorithm):
    Args = None
    primary_view = "local"
    pooled_kinds = {"local": "each client's own model on its own test set, joined (no single "
                             "model)"}

    def _private_keys(self, affine, stats):
        return set(self.init_weights)                 # the whole model stays home

    def broadcast(self, server, client):
        return {}

    def export_models(self, server, clients):
        out = {}                                      # no global model: each client's own
        for c in clients:
            self.load_model({}, c.state["private"])
            out[f"model-{c.name}"] = {k: v.detach().cpu().clone()
                                      for k, v in self.model.state_dict().items()}
        return out

    def local_update(self, client, payload):
        super().local_update(client, payload)
        return {}

    def reads_every_private(self, client):
        return client.id < 0 or self.round == self.cfg.rounds - 1      # + cross-evaluation

    def predict(self, server, client, idx):
        own = super().predict(server, client, idx)
        if self.round < self.cfg.rounds - 1:
            return own
        views = {self.primary_view: own}
        for k in self.clients:                        # cross-evaluation, last round only
            self.load_model({}, k.state["private"])
            views[f"model:{k.name}"] = self.forward_probs(idx)
        return views
