"""CLIP zero-shot. Alec Radford, Jong Wook Kim, Chris Hallacy, Aditya Ramesh, Gabriel
Goh, Sandhini Agarwal, Girish Sastry, Amanda Askell, Pamela Mishkin, Jack Clark,
Gretchen Krueger, Ilya Sutskever, Learning Transferable Visual Models From Natural
Language Supervision, ICML 2021, arXiv:2103.00020. Specification sheet:
../shared/methods/fedmedclip.md (§4, zero-shot).

No training and no communication (0 bytes): every client and the held-out client are
classified by
  (1) p(c | x) = softmax_c(s cos(I, T_c)),  s = 100,
with I the frozen image embedding and T_c the normalised text embedding of the class
prompt(s) ("a picture of a {class}"; several templates are averaged, Radford et al.
§3.1.4). One round by default (more rounds repeat the same evaluation).
Deviations: the images are the dataset's centred squares at the CLIP input size (no
resize-shortest-side + centre crop); s is fixed at 100 (OpenAI CLIP's learned value).
"""
import numpy as np
import torch
from torch import nn

from clip_adapters import ClipArgs, ClipMethod, on_one_thread
from fedmed import register


@register("clip_zeroshot")
class ClipZeroShot(ClipMethod):
    Args = ClipArgs
    primary_view = "zero-shot"
    faults_apply = False              # nothing is trained or sent
    recipe = {"rounds": 1}

    def build_model(self):
        return nn.Module()                            # nothing is trained

    def broadcast(self, server, client):
        return {}

    def local_update(self, client, payload):
        return {}

    @on_one_thread
    @torch.no_grad()
    def predict(self, server, client, idx):
        if len(idx) == 0:
            return np.zeros((0, self.fed.num_classes), np.float32)
        I = self.features[torch.as_tensor(idx, dtype=torch.long)]
        return self.zero_shot(I).cpu().numpy()        # (1)
