"""FedCLIP. Wang Lu, Xixu Hu, Jindong Wang, Xing Xie, FedCLIP: Fast Generalization and
Personalization for CLIP in Federated Learning, IEEE Data Engineering Bulletin 2023 (ICLR
2023 TrustML workshop), arXiv:2302.13485. Public code: github.com/microsoft/PersonalizedFL
(folder fedclip). Specification sheet: ../shared/methods/fedmedclip.md (FedCLIP is the
root of the FACMIC / FedMedCLIP lineage); equations numbered here.

Both CLIP towers are frozen; only the attention adapter (AttAI) is trained and federated:
  (1) a = softmax(W2 tanh(W1 I + b1) + b2)        Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax
  (2) I~ = normalise(a * I)
  (3) L = 1/2 [CE(s I~ T_y^T, [1..B]) + CE(s T_y I~^T, [1..B])],  s = 100
  (4) server: theta <- sum_k n_k / n theta_k   (FedAvg on the adapter, fp32; Deviations)
  (5) prediction: p(c|x) = softmax_c(s I~ T_c^T)
Evaluation views: "global" (the server adapter, every client and the held-out client)
and "personal" (each client's adapter after its local training; the held-out client
uses the server adapter).

Public-code defaults (sheet §7): ViT-B/32; prompt "a picture of a {class}"; Adam lr 5e-5,
betas (0.9, 0.98), eps 1e-6, weight decay 0.2 (L2, torch.optim.Adam), rebuilt each round;
1 local epoch a round; 200 rounds in the README commands; B = 32. These are the defaults
here (`recipe`).

Deviations (the sheet states no FedCLIP rule for these, so the project's shared CLIP
settings stay the defaults, each with a flag or a note for the public code's): the code
averages the adapters with 1/K, here n_k/n as FedAvg (`--weighting uniform` gives 1/K);
the code normalises with ImageNet's mean/std after Resize 256 / CenterCrop 224, here the
CLIP weights' mean/std on the dataset's centred squares resized to 224
(`--clip-preprocess imagenet` gives ImageNet's mean/std; the crop is not reproduced); the
prompt is the code's "a picture of a {class}" with the article the name needs ("a picture
of an actinic keratosis"; the code writes "a" before every name); features come from the
frozen-feature cache (identical to encoding on the fly, no augmentation); s = 100 fixed;
the last round is reported (no validation-based selection).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_adapters import ClipArgs, ClipMethod, adapt, contrastive_loss, on_one_thread
from fedmed import register


class AttentionAdapter(nn.Module):
    """FedCLIP's attention adapter (AttAI; Lu et al. 2023): a = softmax(W2 tanh(W1 I + b1)
    + b2); the adapted feature is a * I. Linear(d,d) -> Tanh -> Linear(d,d) -> Softmax."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Softmax(dim=1))

    def forward(self, I):
        return self.net(I)


@dataclass
class Args(ClipArgs):
    pass


@register("fedclip")
class FedCLIP(ClipMethod):
    Args = Args
    primary_view = "global"
    recipe = {"rounds": 200, "local_epochs": 1, "batch_size": 32, "lr": 5e-5,
              "optimizer": "adam", "weight_decay": 0.2}

    def build_model(self):
        return AttentionAdapter(self.d)                              # (1)

    def loss(self, model, batch, payload, client):
        I, y = batch
        It = adapt(model(I), I)                                      # (2)
        return contrastive_loss(It, self.text[y], self.args.logit_scale)   # (3)

    def local_update(self, client, payload):
        upload = super().local_update(client, payload)               # (4) is FedAvg's
        client.state["adapter"] = {k: v.detach().cpu().clone()       # for the personal view
                                   for k, v in self.model.state_dict().items()}
        return upload

    @torch.no_grad()
    def _probs(self, state: dict, idx):
        self.model.load_state_dict(state)
        self.model.eval()
        I = self.features[torch.as_tensor(idx, dtype=torch.long)]
        It = adapt(self.model(I), I)
        return F.softmax(self.args.logit_scale * It @ self.text.t(), dim=1).cpu().numpy()   # (5)

    @on_one_thread
    def predict(self, server, client, idx):
        if len(idx) == 0:
            empty = np.zeros((0, self.fed.num_classes), np.float32)
            return {"global": empty, "personal": empty}
        private = self.average_private() if self.private_keys else {}
        glob = self._probs({**self.init_weights, **server.weights, **private}, idx)
        own = client.state.get("adapter") if client.id >= 0 else None
        return {"global": glob, "personal": self._probs(own, idx) if own else glob}
