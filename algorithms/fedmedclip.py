"""FedMedCLIP. Yihang Wu, Ahmad Chaddad, Federated CLIP for Resource-Efficient
Heterogeneous Medical Image Classification, AAAI 2026 (main track), arXiv:2511.07929.
Public code: github.com/AIPMLab/FedMedCLIP. Specification sheet:
../shared/methods/fedmedclip.md (section numbers below refer to it; the equations are
numbered here, the paper's own numbering was not verified).

Both CLIP towers are frozen (their features come from clip_adapters' cache). Client k
trains the shared feature-adaptation module theta_F and its private MLP phi_k:
  (1) I~ = normalise(FAM(I) * I),   FAM = MaskedLinear -> standardise -> ReLU ->
      MaskedLinear -> softmax (sheet §5); MLP = 3 x [MaskedLinear -> BN -> ReLU] -> MaskedLinear
  (2) MaskedLinear: u_r = mean_j |W_rj|, m_r = 1[u_r - kappa_r > 0.01], y = x (W * m)^T + b * m
      (the masked bias [unverified], Deviations (b)), kappa_r learnable (straight-through
      gradient where |u_r - kappa_r| <= 1)
  (3) L_contr = 1/2 [CE(s I~ T_y^T, [1..B]) + CE(s T_y I~^T, [1..B])],  s = 100
  (4) L_MLP = CE(O, y),  O = MLP(I~)
  (5) q^(c) = softmax_batch(O[:, c] / tau),  p^(c) = softmax_batch(S[:, c] / tau),  S = I~ T^T
      L_sim = 1/C sum_c sum_i [varpi q_i log(q_i / p_i) + (1 - varpi) p_i log(p_i / q_i)]
  (6) varpi = mean_i H(p_FAM,i) / (H(p_FAM,i) + H(p_MLP,i)),  p_FAM = softmax(s S),
      p_MLP = softmax(O), no gradient
  (7) L = L_contr + L_MLP + lambda L_sim
  (8) server: theta_F <- sum_k w_k theta_F^k over the fp16 + zlib uploads, w_k = 1/K (the
      public code, sheet §3/§7); eta <- gamma eta
  (9) inference, client k: varpi_i = H(p_FAM,i) / (H(p_FAM,i) + H(p_MLP,i)),
      p = varpi_i p_MLP + (1 - varpi_i) p_FAM;  held-out client: p_FAM with the server FAM.
Only theta_F travels, as fp16 + zlib (both directions); phi_k never leaves client k.
Evaluation views in metrics.jsonl: "personal" (9), the aggregated (server) FAM and the
client's MLP, as the public code evaluates after communication (the held-out client: the
server FAM's zero-shot head, as the paper), and "global" (the server FAM's zero-shot head
on every client).

Defaults (sheet §7; [paper] where the sheet says so, else the public code): ViT-B/32
OpenAI weights; prompt "a picture of a {class}"; R = 50 (100 for ISIC2019 [unverified]),
E = 1, B = 32 (drop_last); AdamW betas (0.9, 0.98), eps 1e-6, weight decay 0.02, rebuilt
each round; eta_F = 5e-5, eta_M = 1e-3 (the README's; the script's defaults are 5e-4 /
1e-4, sheet §10.7: both sets are written to config.json, algorithm_info.learning_rates);
gamma = 0.97; lambda = 0.04; tau = 2; s = 100; step offset 0.01; kappa_0 = 0; aggregation
weights 1/K; the personal view with the server FAM. run.py applies `recipe` (which sets
--weighting uniform) to the flags the user leaves unset.

Deviations: (a) where the sheet (§10) recommends fixing a defect of the public code, the
fix is the default and a flag gives the code's behaviour: the threshold trains with a
straight-through estimator and is communicated (code: a step whose backward passes only
|x| > 1, so kappa never trains, and kappa is not sent: `--mask-compat code`); adaptive
varpi in L_sim, the paper's form (code: 1/2, `--sim-weight half`); true entropy -sum p
log p (code: -sum p log_softmax(p), `--entropy code`); CLIP's normalisation (code:
ImageNet's, `--clip-preprocess imagenet`); explicit per-sample standardisation in the FAM
(what the code's InstanceNorm1d does; first public version: BatchNorm, `--fam-norm
batch`). (b) [unverified] `--mask-compat paper` also masks the bias, y = (x W^T + b) * m:
the sheet attributes this to the paper without having checked its full text; the public
code leaves the bias unmasked (`--mask-compat code`). (c) Project choices, off by default,
each a flag: `--weighting samples` averages with n_k/n instead of 1/K (sheet §3 [ours]);
`--personal-fam client` evaluates the personal view with the client's own FAM after its
local training instead of the aggregated one. (d) No validation split, hence no
best-round model selection and no fp32 re-averaging of the best FAMs: the last round is
reported (project rule). (e) Raw cosines / tau in L_sim as the code (`--sim-logit-scale`
rescales them). (f) [code] kappa is reset to 0 when <= 1% of a layer's rows are kept, in
both modes. (g) s is fixed at 100 instead of exp(CLIP logit_scale) (equal for the OpenAI
weights). (h) Images are the dataset's centred squares resized to the CLIP input size (no
resize-shortest-side + centre crop). (i) The held-out client is evaluated on all its
images (the code's drop_last dropped up to B-1). (j) The fp16 blob is a standard zlib
stream made with the Huffman-only strategy (the paper says fp16 + zlib; zlib's default
strategy, as the public code: `--zlib-strategy default`): fp16 weights hold almost no
repeated strings, so it is no larger (946,723 against 948,787 bytes for the 512-d FAM
after 50 rounds) and 3.5x faster to make (9 ms against 33 ms). Lossless either way: the
decoded weights, hence every result but the byte counts, are the same. (k) Prompts take
the article their class name needs ("a picture of an actinic keratosis"); the code
writes "a" before every name.
"""
import json
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedmed
from clip_adapters import (ClipArgs, ClipMethod, adapt, contrastive_loss, flag,
                           on_one_thread, one_thread)
from fedmed import UsageError, register, weighted_average


# -- the masked layers (2), sheet §5 ---------------------------------------------------

class _MaskStep(torch.autograd.Function):
    """m = 1[x > offset] with x = u - kappa. Backward: paper mode, a straight-through
    estimator passing the gradient where |x| <= 1 (sheet §10.1, recommended); code mode,
    the public code's custom step, which passes it only where |x| > 1."""

    @staticmethod
    def forward(ctx, x, offset: float, paper: bool):
        ctx.save_for_backward(x)
        ctx.paper = paper
        return (x > offset).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        window = x.abs() <= 1 if ctx.paper else x.abs() > 1
        return g * window.to(g.dtype), None, None


class MaskedLinear(nn.Module):
    """FedMedCLIP's masked linear layer (sheet §5):
        u_r = mean_j |W_rj|,  m_r = step(u_r - kappa_r) = 1[u_r - kappa_r > 0.01],
        y = x (W * m 1^T)^T + b * m   (paper mode: the bias is masked too [unverified]),
        y = x (W * m 1^T)^T + b       (code mode: the bias is not masked).
    W is Kaiming-uniform (a = sqrt 5, nn.Linear's), kappa starts at 0. In code mode kappa
    gets no gradient in practice (|u - kappa| < 1): the mask is a fixed cut. In training
    mode, [code] kappa is reset to 0 when <= 1% of the rows are kept."""

    def __init__(self, d_in: int, d_out: int, mode: str = "paper", offset: float = 0.01):
        super().__init__()
        lin = nn.Linear(d_in, d_out)
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())
        self.threshold = nn.Parameter(torch.zeros(d_out))
        self.mode, self.offset = mode, offset

    def mask(self) -> torch.Tensor:
        u = self.weight.abs().mean(dim=1)                       # u_r = mean_j |W_rj|
        return _MaskStep.apply(u - self.threshold, self.offset, self.mode == "paper")  # m_r

    def forward(self, x):
        m = self.mask()
        if self.training and m.detach().mean() <= 0.01:   # [code] kappa <- 0 when <= 1% kept
            with torch.no_grad():
                self.threshold.zero_()
            m = self.mask()
        # y = x (W * m 1^T)^T + b * m = (x W^T + b) * m: the row mask scales output features,
        # so W * m is never formed (same values and gradients, a third of the work)
        if self.mode == "paper":
            return F.linear(x, self.weight, self.bias) * m
        return F.linear(x, self.weight) * m + self.bias         # code: bias unmasked


class MaskedFAM(nn.Module):
    """FedMedCLIP's FAM: MaskedLinear(d,d) -> norm -> ReLU -> MaskedLinear(d,d) -> Softmax.
    norm: instance (default: per-sample standardisation over the d features, no affine,
    eps 1e-5, which is what the public code's InstanceNorm1d(d) does to a [B, d] tensor,
    sheet §10.5, and is a LayerNorm without affine) | batch (BatchNorm1d, the first public
    version) | none."""

    def __init__(self, d: int, mode: str = "paper", norm: str = "instance", offset: float = 0.01):
        super().__init__()
        self.fc1 = MaskedLinear(d, d, mode, offset)
        self.norm = {"instance": lambda: nn.LayerNorm(d, eps=1e-5, elementwise_affine=False),
                     "batch": lambda: nn.BatchNorm1d(d), "none": nn.Identity}[norm]()
        self.fc2 = MaskedLinear(d, d, mode, offset)

    def forward(self, I):
        return F.softmax(self.fc2(F.relu(self.norm(self.fc1(I)))), dim=1)


class MaskedMLP(nn.Module):
    """FedMedCLIP's private classifier: 3 x [MaskedLinear(d,d) -> BatchNorm1d -> ReLU] ->
    MaskedLinear(d, C)."""

    def __init__(self, d: int, num_classes: int, mode: str = "paper", offset: float = 0.01,
                 hidden_layers: int = 3):
        super().__init__()
        layers = []
        for _ in range(hidden_layers):
            layers += [MaskedLinear(d, d, mode, offset), nn.BatchNorm1d(d), nn.ReLU()]
        layers.append(MaskedLinear(d, num_classes, mode, offset))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# -- fp16 + zlib: the FAM on the wire (sheet §6) --------------------------------------

ZLIB_STRATEGIES = {"huffman": zlib.Z_HUFFMAN_ONLY, "default": zlib.Z_DEFAULT_STRATEGY}


def pack_fp16_zlib(state: dict, level: int = -1, strategy: str = "huffman") -> torch.Tensor:
    """A state dict as one zlib stream (RFC 1950, read back by any zlib.decompress) of a
    JSON header (names, dtypes, shapes) and the raw bytes, floating tensors as float16,
    integer tensors as they are. Strategy "huffman" (Z_HUFFMAN_ONLY) entropy-codes the
    bytes without LZ77 string matching: trained fp16 weights hold almost no repeated
    strings, so matching only costs time (a 512x512 FAM: 946,723 bytes in ~9 ms against
    948,787 bytes in ~33 ms with zlib's default strategy and level); "default" is zlib's
    own. The blob travels as a uint8 tensor: torch.save stores a tensor's bytes as they
    are, while a Python `bytes` object is pickled as latin-1 text (about 1.5x larger)."""
    header, arrays = [], []
    for k, v in state.items():
        v = v.detach().cpu()
        a = (v.to(torch.float16) if v.is_floating_point() else v).contiguous().numpy()
        header.append([k, a.dtype.str, list(a.shape)])
        arrays.append(a.reshape(-1).view(np.uint8))
    h = json.dumps(header).encode()
    z = zlib.compressobj(level, strategy=ZLIB_STRATEGIES[strategy])   # zlib's own method, window, memLevel
    parts = [z.compress(len(h).to_bytes(4, "little") + h)]
    parts += [z.compress(a) for a in arrays]           # no joined copy of the raw bytes
    parts.append(z.flush())
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def unpack_fp16_zlib(blob) -> dict:
    """Inverse of pack_fp16_zlib; floating tensors come back as float32 (exactly the fp16
    values: the conversion is exact)."""
    raw = zlib.decompress(blob.numpy() if torch.is_tensor(blob) else blob)
    n = int.from_bytes(raw[:4], "little")
    header = json.loads(raw[4:4 + n])
    out, pos = {}, 4 + n
    for k, dt, shape in header:
        dtype = np.dtype(dt)
        count = int(np.prod(shape))
        a = np.frombuffer(raw, dtype, count=count, offset=pos).reshape(shape)
        pos += count * dtype.itemsize
        out[k] = torch.from_numpy(a.astype(np.float32) if dtype.kind == "f" else a.copy())
    return out


@dataclass
class Args(ClipArgs):
    lr_mlp: float = flag(1e-3, "eta_M: learning rate of the private MLP (eta_F is --lr); "
                         "the README's 1e-3 (the script's: 1e-4)")
    lr_decay: float = flag(0.97, "gamma: both learning rates are multiplied by it each round")
    lambda_sim: float = flag(0.04, "lambda: weight of the class-level KL L_sim")
    sim_tau: float = flag(2.0, "tau: temperature of the class-level KL")
    sim_weight: str = flag("adaptive", "varpi in L_sim: adaptive (entropy ratio, paper) | "
                           "half (public code)")
    sim_logit_scale: float = flag(1.0, "scale of the FAM's raw cosines S inside L_sim")
    mask_compat: str = flag("paper", "masked linear: paper (trained threshold, straight-through, "
                            "sent; the bias masked too, an [unverified] attribution to the "
                            "paper) | code (public code: inert threshold, not sent, bias "
                            "unmasked)")
    mask_offset: float = flag(0.01, "offset of the mask's step, m = 1[u - kappa > offset]")
    fam_norm: str = flag("instance", "FAM normalisation: instance (per-sample standardisation) | "
                         "batch (first public version) | none")
    entropy: str = flag("true", "entropy in the ensemble weight: true | code (-sum p log_softmax p)")
    personal_fam: str = flag("server", "FAM of the personal view: server (the aggregated FAM, "
                             "as the public code evaluates) | client (project choice: the "
                             "client's FAM after its local training)")
    zlib_level: int = flag(-1, "zlib level of the fp16 FAM blob (-1: zlib's default, 6)")
    zlib_strategy: str = flag("huffman", "zlib strategy of the fp16 FAM blob: huffman "
                              "(Z_HUFFMAN_ONLY: entropy coding only, 3x faster, no larger) | "
                              "default (zlib's default)")


CHOICES = {"sim_weight": ("adaptive", "half"), "mask_compat": ("paper", "code"),
           "fam_norm": ("instance", "batch", "none"), "entropy": ("true", "code"),
           "personal_fam": ("client", "server"), "zlib_strategy": ("huffman", "default")}


def entropy(p: torch.Tensor, mode: str = "true") -> torch.Tensor:
    """H(p_i) = -sum_c p_ic log p_ic per row; mode "code": -sum_c p_ic log_softmax(p_i)_c
    (the public code applies log_softmax to probabilities, sheet §10.4)."""
    if mode == "code":
        return -(p * F.log_softmax(p, dim=1)).sum(1)
    return -(p * p.clamp_min(1e-12).log()).sum(1)


def entropy_weight(p_fam: torch.Tensor, p_mlp: torch.Tensor, mode: str = "true") -> torch.Tensor:
    """varpi_i = H(p_FAM,i) / (H(p_FAM,i) + H(p_MLP,i)) per sample, (6) and (9)."""
    h_fam, h_mlp = entropy(p_fam, mode), entropy(p_mlp, mode)
    return h_fam / (h_fam + h_mlp).clamp_min(1e-12)


def ensemble(p_fam: torch.Tensor, p_mlp: torch.Tensor, mode: str = "true") -> torch.Tensor:
    """(9): p = varpi p_MLP + (1 - varpi) p_FAM, per sample."""
    w = entropy_weight(p_fam, p_mlp, mode)[:, None]
    return w * p_mlp + (1 - w) * p_fam


def class_level_kl(S: torch.Tensor, O: torch.Tensor, tau: float, varpi) -> torch.Tensor:
    """(5): for each class column c, q^(c) = softmax over the batch of O[:, c]/tau (MLP),
    p^(c) = softmax over the batch of S[:, c]/tau (FAM); sum-reduced KLs, no tau^2:
    1/C sum_c [varpi KL(q^(c) || p^(c)) + (1 - varpi) KL(p^(c) || q^(c))]."""
    log_p = F.log_softmax(S / tau, dim=0)
    log_q = F.log_softmax(O / tau, dim=0)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(0)          # KL(q^(c) || p^(c)), [C]
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(0)          # KL(p^(c) || q^(c)), [C]
    return (varpi * kl_qp + (1 - varpi) * kl_pq).mean()


class FedMedCLIPNet(nn.Module):
    """The trainable part of one client: the shared FAM and the private MLP."""

    def __init__(self, d: int, num_classes: int, a: Args):
        super().__init__()
        self.fam = MaskedFAM(d, a.mask_compat, a.fam_norm, a.mask_offset)
        self.mlp = MaskedMLP(d, num_classes, a.mask_compat, a.mask_offset)


@register("fedmedclip")
class FedMedCLIP(ClipMethod):
    Args = Args
    primary_view = "personal"
    decoupled_weight_decay = True                     # AdamW
    coded_upload = True               # the FAM travels as fp16 + zlib bytes: no NaN to inject
    recipe = {"rounds": 50, "local_epochs": 1, "batch_size": 32, "lr": 5e-5,
              "optimizer": "adam", "weight_decay": 0.02, "weighting": "uniform"}
    # sheet §10.7: the README's learning rates (the defaults) and the script's
    LEARNING_RATES = {"readme": {"eta_F": 5e-5, "eta_M": 1e-3},
                      "script": {"eta_F": 5e-4, "eta_M": 1e-4}}

    def __init__(self, cfg, args, fed):
        args = args if args is not None else Args()
        for k, options in CHOICES.items():
            if getattr(args, k) not in options:
                raise UsageError(f"--{k.replace('_', '-')} {getattr(args, k)!r} is unknown; "
                                 f"choose {' or '.join(options)}")
        if not -1 <= args.zlib_level <= 9:
            raise UsageError(f"--zlib-level must lie in -1..9 (got {args.zlib_level})")
        super().__init__(cfg, args, fed)
        # what travels: the FAM (without its thresholds in code mode, sheet §10.1)
        self.fam_keys = [k for k in self.init_weights if k.startswith("fam.")
                         and not (args.mask_compat == "code" and k.endswith(".threshold"))]
        self._bcast = self._decoded = None
        self.info["learning_rates"] = {"used": {"eta_F": cfg.lr, "eta_M": args.lr_mlp},
                                       **self.LEARNING_RATES}

    def build_model(self):
        return FedMedCLIPNet(self.d, self.fed.num_classes, self.args)

    def _private_keys(self, affine, stats):
        return {k for k in self.init_weights if k.startswith("mlp.")}

    def setup(self, server, clients):
        super().setup(server, clients)
        with one_thread():
            server.weights = {k: v.clone() for k, v in self.init_weights.items()
                              if k.startswith("fam.")}
            for c in clients:                          # each client initialises its own phi_k
                with fedmed.seeded(self.cfg.seed, "mlp-init", c.id):
                    mlp = MaskedMLP(self.d, self.fed.num_classes, self.args.mask_compat,
                                    self.args.mask_offset)
                c.state["private"] = {f"mlp.{k}": v.detach().clone()
                                      for k, v in mlp.state_dict().items()}

    # -- communication: the FAM only, fp16 + zlib (every hook on one thread, as ClipMethod's)
    @on_one_thread
    def broadcast(self, server, client):
        if self._bcast is None or self._bcast[0] != self.round:      # one blob per round
            self._bcast = (self.round, self._pack({k: server.weights[k] for k in self.fam_keys}))
        return {"fam": self._bcast[1]}

    @on_one_thread
    def local_update(self, client, payload):
        self.load_model(self._received(payload["fam"]), client.state["private"])
        self.train(client, payload)
        sd = self.model.state_dict()
        client.state["private"] = {k: sd[k].detach().cpu().clone() for k in self.private_keys}
        if self.args.personal_fam == "client":
            client.state["fam"] = {k: sd[k].detach().cpu().clone() for k in sd if k.startswith("fam.")}
        return {"fam": self._pack({k: sd[k] for k in self.fam_keys}), "n": client.n}

    def _pack(self, state: dict) -> torch.Tensor:
        return pack_fp16_zlib(state, self.args.zlib_level, self.args.zlib_strategy)

    def _received(self, blob: torch.Tensor) -> dict:
        """The broadcast FAM as a client decodes it. Every client of a round receives the
        same bytes (each copy is counted) and decoding is a pure function, so the
        simulation decodes a blob once and reuses the result while the bytes are equal."""
        if self._decoded is None or not torch.equal(self._decoded[0], blob):
            self._decoded = (blob, unpack_fp16_zlib(blob))
        return self._decoded[1]

    @on_one_thread
    def aggregate(self, server, uploads):
        """(8): theta_F <- sum_k w_k theta_F^k, w_k = 1/K (the recipe's --weighting uniform,
        the public code) or n_k / n (--weighting samples)."""
        ups = [uploads[k] for k in sorted(uploads)]
        states = [unpack_fp16_zlib(u["fam"]) for u in ups]
        w = [u["n"] for u in ups] if self.cfg.weighting == "samples" else [1] * len(ups)
        for key in states[0]:
            tensors = [s[key] for s in states]
            server.weights[key] = (torch.stack(tensors).max() if key.endswith("num_batches_tracked")
                                   else weighted_average(tensors, w))

    # -- local training ---------------------------------------------------------------
    def param_groups(self):
        return [{"params": list(self.model.fam.parameters()),              # eta_F gamma^r
                 "lr": self.lr_now(self.cfg.lr)},
                {"params": list(self.model.mlp.parameters()),              # eta_M gamma^r
                 "lr": self.lr_now(self.args.lr_mlp)}]

    def loss(self, model, batch, payload, client):
        a = self.args
        I, y = batch
        It = adapt(model.fam(I), I)                                      # (1) I~
        L_contr = contrastive_loss(It, self.text[y], a.logit_scale)      # (3)
        O = model.mlp(It)
        L_mlp = F.cross_entropy(O, y)                                    # (4)
        S = It @ self.text.t()                                           # raw cosines
        if a.sim_weight == "adaptive":
            with torch.no_grad():                                        # (6)
                varpi = entropy_weight(F.softmax(a.logit_scale * S, dim=1),
                                       F.softmax(O, dim=1), a.entropy).mean()
        else:
            varpi = 0.5
        L_sim = class_level_kl(a.sim_logit_scale * S, O, a.sim_tau, varpi)   # (5)
        return L_contr + L_mlp + a.lambda_sim * L_sim                    # (7)

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _heads(self, fam_state: dict, private: dict | None, idx):
        self.load_model(fam_state, private or {})
        self.model.eval()
        I = self.features[torch.as_tensor(idx, dtype=torch.long)]
        It = adapt(self.model.fam(I), I)
        p_fam = F.softmax(self.args.logit_scale * It @ self.text.t(), dim=1)
        p_mlp = F.softmax(self.model.mlp(It), dim=1) if private is not None else None
        return p_fam, p_mlp

    @on_one_thread
    def predict(self, server, client, idx):
        if len(idx) == 0:
            empty = np.zeros((0, self.fed.num_classes), np.float32)
            return {"personal": empty, "global": empty}
        p_global, _ = self._heads(server.weights, None, idx)
        if client.id < 0:                                 # held-out: the server FAM's head
            return {"personal": p_global.cpu().numpy(), "global": p_global.cpu().numpy()}
        fam = client.state.get("fam") if self.args.personal_fam == "client" else None
        p_fam, p_mlp = self._heads(fam or server.weights, client.state["private"], idx)
        p = ensemble(p_fam, p_mlp, self.args.entropy)                   # (9)
        return {"personal": p.cpu().numpy(), "global": p_global.cpu().numpy()}
