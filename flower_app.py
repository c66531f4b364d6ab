"""FedMed on Flower's deployment engine (flwr 1.42, Message API): any registered method as
a Flower ServerApp + ClientApp, each hospital a SuperNode holding one client's data.

    flower-superlink --insecure --host 0.0.0.0 --port 9091               # the server machine
    flower-supernode --insecure --superlink HOST:9091 --port 9094 \\
        --node-config 'client="hospital-a" data-dir="/data/isic"'        # one per hospital
    flwr run . fedmed -c 'args="--algo fedavg --rounds 20 --out /abs/runs/fedavg"'

The round loop stays fedmed's (`fedmed._rounds`, the same as `python run.py`): the server
runs run.py's command line with a `FlowerTransport` in place of the in-process one
(`fedmed.InProcess`). Each round the server calls the method's protocol hooks
(set_round, begin_round, participants), its `broadcast` for every participant, sends
each payload to the node of that client (a "train" message), folds/aggregates what comes
back exactly as in process, then sends the aggregated server state to every node (an
"evaluate" message) and writes the metric lines the nodes return. A node rebuilds the
method from the same command line (same seed: the same initial model and the same
random streams), keeps its client's `client.state` (FedBN's private BN layers, a CLIP
method's MLP, a teacher, the optimiser state, ...) in a file of its own state folder
between rounds, and answers with the upload (train) or with its metric lines plus its
test labels and predicted probabilities (evaluate; the pooled test-set line of
metrics.jsonl needs them). Payloads travel as the bytes fedmed.transmit counts (torch.save
of the payload), so bytes_up/bytes_down are the same as in process.

Node config (flower-supernode --node-config): `isolate` (true: read only this client's
images even of a generated dataset; implied by `data-dir`), `client` (its name in the federation, e.g.
"site-0") or `partition-id` (its index in the training clients, then the held-out ones), `data-dir` (this site's data folder; replaces
--data-dir of the command line), `state-dir` (where it keeps its client state between
rounds; default ~/.fedmed/flower-nodes). Run config (pyproject.toml [tool.flwr.app.config],
`flwr run -c`): `args` (run.py's command line; --out should be an absolute path on the
server), `node-timeout` (seconds to wait for every client's node to appear),
`round-timeout` (seconds a round waits for a reply, 0: no limit), `on-dropout`
("continue": the round completes with the clients that answered, the lost ones are named
in the log; "wait": the same message goes again to the node that next claims a lost
client, e.g. its SuperNode started again with its state folder; "fail": the run stops,
resumable with --resume).

A node reads its own client's images only and the server none (datasets.pixels_of: the
others' pixels are zeros, the server's image tensor is empty, so any server-side read of
an image fails loudly); with --dataset isic2019 a site's folder may hold its own images
and the CSVs only.

Deviations from `python run.py`: the server, like every node, builds the federation from
the data flags (to know the clients, their sizes, labels and the split it records in
config.json; with --dataset synthetic every party regenerates it from the seed);
--secagg (simulated in one process) and methods that read a client's data or state
outside its own node (`crosses_sites`: pooled, FACMIC; clip_svm's --svm-pooled and
--unseen-dir; FedAL's --al-reinit) are refused. A step of the server's code that reads
what only a client holds runs on its node (Algorithm.at_clients: clip_svm's classifiers,
FedAL's acquisition, FCU's audit); evaluations and exported models that read every
client's private tensors (Algorithm.reads_every_private; model.pt under --bn local,
model-CLIENT.pt) get them from the nodes first, and a local update that reads the
server's state (Algorithm.sends_server_state: FCU's unlearning step reads theta_o) gets
it with its payload (neither counted in the bytes: read in place in process). A node
builds the method with the server's arguments and rounds of the run (`settings`: a
protocol's phase sets some that no flag gives). A protocol's runs of the loop (FCU's
phases) each ask the nodes again which client they hold; a run that starts from a
client's state at the end of an earlier run (FCU's PGA: u's last local model) has that
client's node read it from its own state folder (`origin`). A client's state is read
only where it lives (`Elsewhere`). --seeds and --leave-one-out send each run's own
command line to the nodes (`one_run_argv`).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shlex
import sys
import time
import traceback
import uuid

INSTALL = "flwr is not installed; pip install -r requirements-flower.txt (Flower 1.42)"
try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: F401
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid, ServerApp
except ImportError:                                  # the entry point says how to install it
    if __name__ == "__main__":
        print(f"error: {INSTALL}", file=sys.stderr)
        sys.exit(2)
    raise

import torch

import fedmed
import run as cli

KEY = "fedmed"                         # the one ConfigRecord of every message


# ---------------------------------------------------------------- the wire format

def pack(obj) -> bytes:
    """What fedmed.transmit sends and counts: torch.save of the payload; b"" for an empty
    one (transmit sends nothing and counts 0)."""
    if not obj:
        return b""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> dict:
    """The receiver's copy, as fedmed.transmit hands it over."""
    if not data:
        return {}
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def record(**values) -> RecordDict:
    return RecordDict({KEY: ConfigRecord(values)})


class Elsewhere(dict):
    """The state of a client that is held by another party (on the server: every
    client's, which live on their nodes; on a node: every other client's). Any use is a
    one-line error naming the method, instead of a silent read of the state `setup` made
    (what the copy here would hold)."""

    def __init__(self, name: str, algo: str, where: str):
        super().__init__()
        self.text = (f"--algo {algo} reads client {name}'s state {where}, where it is not "
                     "(it stays on that client's node); this does not run on Flower yet, "
                     "run it with python run.py")

    def _refuse(self, *a, **k):
        raise fedmed.UsageError(self.text)

    __getitem__ = __setitem__ = __delitem__ = __contains__ = __iter__ = __len__ = _refuse
    get = keys = items = values = pop = setdefault = update = copy = _refuse

    def __reduce__(self):
        self._refuse()


def elsewhere(clients: list, algo: str, where: str, keep=None) -> None:
    """Put an `Elsewhere` in place of the state of every client but `keep`."""
    for c in clients:
        if c is not keep:
            c.state = Elsewhere(c.name, algo, where)


class NodeError(fedmed.UsageError):
    """A node's ClientApp failed with an error that is not FedMed's own (its traceback is
    in the node's log): the server stops with one line naming the node (exit 2)."""


def _reply_error(e: Exception) -> RecordDict:
    return record(error=type(e).__name__, text=str(e))


def _content(reply: Message, who: str) -> dict:
    """The reply's values; a FedMed error on the node is raised here as the same class."""
    if reply.has_error():
        raise NodeError(f"{who}: the node's ClientApp failed ({reply.error.reason})")
    rec = dict(reply.content[KEY])
    if "error" in rec:
        kind = {"UsageError": fedmed.UsageError, "Diverged": fedmed.Diverged}.get(rec["error"],
                                                                                NodeError)
        text = rec["text"]
        raise kind(text if text.startswith(("node ", "round ")) else f"{who}: {text}")
    return rec


# ---------------------------------------------------------------- the server side

class FlowerTransport(fedmed.InProcess):
    """fedmed's transport over a Flower Grid: each client on the node that holds it."""

    def __init__(self, grid: Grid, run_config: dict, log=None):
        self.grid = grid
        self.node_timeout = float(run_config.get("node-timeout", 120))
        self.round_timeout = float(run_config.get("round-timeout", 0)) or None
        self.on_dropout = str(run_config.get("on-dropout", "continue"))
        if self.on_dropout not in ("continue", "fail", "wait"):
            raise fedmed.UsageError(f"on-dropout = {self.on_dropout!r}: use \"continue\", "
                                    "\"wait\" or \"fail\"")
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.node_of: dict = {}                         # client name -> node id
        self.asked: set = set()                         # node ids asked which client they hold
        self.rounds_begun = False                       # a client's node may be replaced then
        self.state_round: dict = {}                     # client name -> round of its state
        self.down: set = set()                          # nodes lost during this run
        self.wire = {"sent": 0, "received": 0}          # Flower message bytes (Message API)
        self.node_seconds = {"train": 0.0, "evaluate": 0.0}   # in local_update / predict

    # -- what run.py and fedmed.run ask --------------------------------------------------
    def check(self, ns, cls) -> None:
        if ns.layer_settings and ns.layer_settings[1]:
            raise fedmed.UsageError("--secagg (its key agreement and unmasking are simulated "
                                    "in one process) does not run on Flower yet; run it with "
                                    "python run.py")
        ns.decode_only = ()                     # the server reads no image (datasets.pixels_of)
        why = cls.crosses_sites_of(ns)
        if why:
            raise fedmed.UsageError(f"--algo {ns.algo} does not run on Flower: {why}, "
                                    "while each site's data stay on its node; run it with "
                                    "python run.py")

    def bind(self, algo, cfg, clients, holdout, rec, out, resume) -> None:
        """Before each run of the loop (one per seed and fold of --seeds and
        --leave-one-out): the nodes are asked again which client they hold, with this
        run's data identity."""
        super().bind(algo, cfg, clients, holdout, rec, out, resume)
        self.argv = one_run_argv(rec["argv"], cfg.seed, [c.name for c in holdout])
        # the method's settings as this run has them (a protocol's phase changes some that
        # no flag gives, e.g. FCU's phase and its rounds): a node builds with these
        self.settings = json.dumps({"args": rec["algorithm_args"], "rounds": cfg.rounds},
                                   default=fedmed._jsonable)
        self.node_of, self.asked, self.rounds_begun = {}, set(), False
        level, depth = algo, 0                      # the server's steps that read a client
        while True:                                 # run on its node (Algorithm.at_clients)
            level.at_clients = (lambda server, who, step, *args, d=depth:
                                self._at_clients(d, server, who, step, args))
            if not isinstance(level, fedmed.Wrapper):
                break
            level, depth = level.base, depth + 1
        self.identity = rec["data_identity"]
        self.token = uuid.uuid4().hex                   # names the nodes' state files; a
                                                        # --resume reads it from the checkpoint
        self.state_round = {c.name: 0 for c in clients + holdout}
        self.clients_training = clients
        self.clients = clients + holdout          # every one on a node (a held-out client's
                                                  # node only evaluates)
        self.origin = self._origin(algo)
        elsewhere(self.clients, cfg.algo, "on the server")
        self._discover()

    @staticmethod
    def _origin(algo) -> dict:
        """{client name: what its node takes into its start state from its own state at
        the end of an earlier Flower run}: a method's `carries` (FCU's PGA phase: u's last
        local model of the original run), with that run's token and the client's round
        there, from that run's checkpoint."""
        inner = algo
        while isinstance(inner, fedmed.Wrapper):
            inner = inner.base
        carries = getattr(inner, "carries", None)
        if not carries:
            return {}
        path = os.path.join(carries["run"], "checkpoint.pt")
        saved = (fedmed.load_checkpoint(path, "Flower").get("transport") or {}).get("flower")
        if saved is None:
            raise fedmed.UsageError(f"{path} was not written by a Flower run; its clients' "
                                    "states are in the checkpoint: run this with python run.py")
        return {carries["client"]: json.dumps({"token": saved["token"], "keys": carries["keys"],
                                               "round": saved["state_round"][carries["client"]]})}

    def checkpoint(self) -> dict:
        return {"transport": {"flower": {"token": self.token,
                                         "state_round": dict(self.state_round)}}}

    def client_records(self, clients: list) -> list:
        return [{"state": {}, "train": c.train, "unlabeled": c.unlabeled} for c in clients]

    def checkpointed(self, clients: list) -> None:
        """(The optimiser state of each client is in its node's state file.)"""

    def restore(self, ck: dict) -> None:
        saved = (ck.get("transport") or {}).get("flower")
        if saved is None:
            raise fedmed.UsageError("--resume on Flower: the checkpoint was not written by a "
                                    "Flower run; resume it with python run.py")
        self.token = saved["token"]
        self.state_round = dict(saved["state_round"])
        elsewhere(self.clients, self.algo.cfg.algo, "on the server")

    def export(self, algo, server, clients) -> dict:
        """The end-of-run models; where they need the clients' private tensors (FedBN's
        model.pt is the held-out rule's n_k-average, model-CLIENT.pt each client's own),
        those are gathered from the nodes first, as for such an evaluation."""
        inner = algo
        while isinstance(inner, fedmed.Wrapper):   # (a layer: the method it wraps)
            inner = inner.base
        if not inner.private_keys:
            return algo.export_models(server, clients)
        got = self._privates(algo.cfg.rounds - 1, clients)
        for c in clients:
            c.state = {"private": got[c.name]}
        try:
            return algo.export_models(server, clients)
        finally:
            elsewhere(clients, algo.cfg.algo, "on the server")

    # -- messages ---------------------------------------------------------------------
    def _message(self, kind: str, node: int, t: int, **values) -> Message:
        values.update(argv=json.dumps(self.argv), token=self.token, round=t,
                      settings=self.settings)
        if values.get("client") in self.origin:
            values["origin"] = self.origin[values["client"]]
        return Message(record(**values), dst_node_id=node, message_type=kind,
                       group_id=str(t + 1))

    def _exchange(self, messages: dict, timeout: float | None, enough=None) -> tuple[dict, dict]:
        """Send {key: Message}; return ({key: reply}, {key: why it is lost}) once every
        key has a reply, its node has left the federation, or `timeout` has passed; or
        as soon as `enough(replies)` is true (the others are then neither)."""
        node = {k: m.metadata.dst_node_id for k, m in messages.items()}
        lost = {k: f"its node {node[k]} was lost earlier in this run" for k in messages
                if node[k] in self.down}
        live = [m for k, m in messages.items() if k not in lost]
        ids = dict(zip(self.grid.push_messages(live) if live else [],
                       [k for k in messages if k not in lost]))
        for m in live:
            self.wire["sent"] += _size(m)
        replies, t0, last_check = {}, time.monotonic(), time.monotonic()
        transient: set = set()                          # lost replies of nodes still there
        while len(replies) + len(lost) < len(messages):
            for r in self.grid.pull_messages([i for i, k in ids.items()
                                              if k not in replies and k not in lost]):
                k = ids.get(r.metadata.reply_to_message_id)
                if k is None:
                    continue
                if r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE:
                    lost[k] = f"its node {node[k]} stopped reporting to the SuperLink"
                    continue
                if r.has_error() and r.error.code in REPLY_LOST:   # e.g. the node was killed
                    lost[k] = f"its reply did not arrive ({r.error.reason[:80]})"  # mid-upload
                    transient.add(k)
                    continue
                replies[k] = r
                self.wire["received"] += _size(r)
            now = time.monotonic()
            if now - last_check > 1.0:                  # a node that left: its reply is lost
                last_check = now
                online = set(self.grid.get_node_ids())
                for k in messages:
                    if k not in replies and k not in lost and node[k] not in online:
                        lost[k] = f"its node {node[k]} left the federation"
                    elif k not in replies and k not in lost and node[k] in self.down:
                        lost[k] = f"its node {node[k]} was replaced"
            if timeout is not None and now - t0 > timeout:
                for k in messages:
                    if k not in replies and k not in lost:
                        lost[k] = f"no reply within round-timeout = {timeout:g} s"
            if enough is not None and enough(replies):
                break
            if len(replies) + len(lost) < len(messages):
                time.sleep(0.1)
        self.down |= {node[k] for k in lost if k not in transient}   # not waited for again
        return replies, lost

    def _discover(self, want: set | None = None) -> None:
        """Ask every node not asked yet which client it holds until each client of `want`
        (default: all) has one, or fail after node-timeout seconds, naming the clients
        without a node."""
        want = {c.name for c in self.clients} if want is None else set(want)
        t0 = time.monotonic()
        while not want <= set(self.node_of):
            new = [n for n in self.grid.get_node_ids() if n not in self.asked and n not in self.down]
            if new:
                self.asked |= set(new)
                replies, lost = self._exchange(   # a node that left without the SuperLink
                    {n: self._message("query", n, -1, identity=json.dumps(self.identity))
                     for n in new}, self.node_timeout,  # knowing yet is not waited for
                    enough=lambda r: want <= set(self.node_of) | {_claim(x) for x in r.values()})
                for n in new:
                    if n in lost:
                        self.log(f"flower: node {n} did not answer ({lost[n]})")
                        continue
                    if n not in replies:
                        self.asked.discard(n)           # asked again if still needed
                        continue
                    name = _content(replies[n], f"node {n}")["client"]
                    old = self.node_of.get(name)
                    if old not in (None, n):
                        if not self.rounds_begun:        # two nodes given one client
                            raise fedmed.UsageError(f"nodes {old} and {n} both hold client "
                                                    f"{name}; give each node its own client")
                        self.down.add(old)               # its SuperNode was started again
                        self.log(f"flower: node {n} holds client {name} (in place of node "
                                 f"{old}, not used any more)")
                    else:
                        self.log(f"flower: node {n} holds client {name}")
                    self.node_of[name] = n
            if time.monotonic() - t0 > self.node_timeout and not want <= set(self.node_of):
                missing = sorted(want - set(self.node_of))
                raise fedmed.UsageError(f"no Flower node holds client {missing[0]} "
                                        f"({len(missing)} client(s) without a node after "
                                        f"node-timeout = {self.node_timeout:g} s); start a "
                                        f"supernode with --node-config 'client=\"{missing[0]}\"'"
                                        + ("" if self.state_round.get(missing[0], 0) == 0 else
                                           " and the state-dir it had, then continue with "
                                           "--resume"))
            time.sleep(0.2)

    def _gather(self, t: int, make: dict, kind: str) -> tuple[dict, dict]:
        """Send make[name](node id) to the node of each client `name`; ({name: reply},
        {name: why it is lost}). on-dropout = wait: a lost client's message goes again,
        the same one, to the node that next claims that client (the SuperNode started
        again with the state folder it had: it answers from the state it had kept), for
        up to node-timeout seconds each time."""
        replies, lost = self._exchange({n: f(self.node_of[n]) for n, f in make.items()},
                                       self.round_timeout)
        while lost and self.on_dropout == "wait":
            for name, why in lost.items():
                self.log(f"flower: round {t + 1}: client {name} was lost ({why}); waiting up to "
                         f"node-timeout = {self.node_timeout:g} s for its node to come back "
                         f"({kind} is sent again)")
                if self.node_of[name] in self.down:     # else: its node is still there
                    self.node_of.pop(name)
            self._discover(set(lost))
            more, lost = self._exchange({n: make[n](self.node_of[n]) for n in lost},
                                        self.round_timeout)
            replies.update(more)
        return replies, lost

    def train(self, t, server, participants, status):
        algo = self.algo
        self.rounds_begun = True
        make, down = {}, {}
        for c in participants:                          # the hooks in the loop's order
            data = pack(algo.broadcast(server, c))
            down[c.name] = len(data)
            state = (pack({"weights": server.weights, "state": server.state})
                     if algo.sends_server_state(c) else b"")   # (not counted: read in place
            make[c.name] = (lambda node, data=data, c=c, state=state: self._message(  # in process)
                "train", node, t, payload=data, client=c.name, server=state,
                state_round=self.state_round[c.name], note=json.dumps(algo.note_of(c))))
        status(f"round {t + 1}/{algo.cfg.rounds}: training {len(make)} client(s) on Flower")
        replies, lost = self._gather(t, make, "its update")
        for c in participants:                          # fold in the loop's order
            if c.name in lost:
                self._lost(t, c.name, lost[c.name])
                yield c, None, 0, down[c.name]
                continue
            rec = _content(replies.pop(c.name), f"node {self.node_of[c.name]} (client {c.name})")
            self.state_round[c.name] = t + 1
            algo.set_note(c, json.loads(rec["note"]))   # e.g. the privacy layer's dp_norm
            self.node_seconds["train"] += float(rec.get("seconds", 0.0))
            data = rec["upload"]
            yield c, unpack(data), len(data), down[c.name]

    def _lost(self, t: int, name: str, why: str) -> None:
        if self.on_dropout == "fail":
            raise fedmed.UsageError(f"round {t + 1}: client {name} was lost ({why}); start its "
                                    "node again and continue with --resume")
        self.log(f"flower: round {t + 1}: client {name} dropped out ({why}); the round "
                 "completes with the others")

    def _privates(self, t: int, clients: list) -> dict:
        """Every training client's private tensors after round t (a "query" to each node),
        for the evaluations that read them all (Algorithm.reads_every_private: the held-out
        rule, local's cross-evaluation); a lost client's as {} (left out of an average)."""
        make = {c.name: (lambda node, c=c: self._message(
                    "query", node, t, ask="private", client=c.name,
                    state_round=self.state_round[c.name]))
                for c in clients if c.name in self.node_of}
        replies, lost = self._gather(t, make, "the query for its private tensors")
        got = {}
        for c in clients:
            if c.name in replies:
                rec = _content(replies[c.name], f"node {self.node_of[c.name]} (client {c.name})")
                got[c.name] = unpack(rec["private"])
            else:
                got[c.name] = {}
        return got

    def _every_private(self, t: int, clients: list) -> bytes:
        """What a node needs to read every training client's private tensors as in
        process: the tensors (`_privates`) and each client's note (e.g. FedAL's pools,
        whose sizes n_k weight the held-out rule's average)."""
        return pack({"all": self._privates(t, clients),
                     "notes": {c.name: json.dumps(self.algo.note_of(c)) for c in clients}})

    def _at_clients(self, depth: int, server, clients: list, step: str, args: tuple) -> list:
        """Algorithm.at_clients on Flower: the step runs on each client's node (on the
        method `depth` wrappers down), with the server state and the arguments sent there;
        every client must answer."""
        t = self.algo.round
        data = pack({"weights": server.weights, "state": server.state})
        given = pack({"args": list(args)})
        privates = (self._every_private(t, self.clients_training)
                    if any(self.algo.reads_every_private(c) for c in clients) else b"")
        make = {c.name: (lambda node, c=c: self._message(
                    "query", node, t, ask="step", step=step, depth=depth, args=given,
                    server=data, client=c.name, state_round=self.state_round[c.name],
                    privates=privates, note=json.dumps(self.algo.note_of(c))))
                for c in clients}
        replies, lost = self._gather(t, make, f"its step {step}")
        for name, why in lost.items():
            raise fedmed.UsageError(f"{step}: client {name} was lost ({why}); every client "
                                    "must answer it; start its node again and continue "
                                    "with --resume")
        return [unpack(_content(replies[c.name], f"node {self.node_of[c.name]} (client "
                                f"{c.name})")["result"])["result"] for c in clients]

    def evaluate(self, t, server, clients, holdout, up_bytes, down_bytes, seconds) -> list:
        data = pack({"weights": server.weights, "state": server.state})
        need = [c.name for c in clients + holdout if self.algo.reads_every_private(c)]
        privates = self._every_private(t, clients) if need else b""
        make = {c.name: (lambda node, c=c: self._message(
                    "evaluate", node, t, server=data, client=c.name,
                    state_round=self.state_round[c.name], up=int(up_bytes.get(c.id, 0)),
                    down=int(down_bytes.get(c.id, 0)),
                    privates=privates if c.name in need else b"",
                    note=json.dumps(self.algo.note_of(c))))
                for c in clients + holdout}
        replies, lost = self._gather(t, make, "its evaluation")
        lines, ys, probs = [], {}, {}
        for c in clients + holdout:
            if c.name in lost:
                self._lost(t, c.name, lost[c.name] + "; not evaluated this round")
                continue
            rec = _content(replies.pop(c.name), f"node {self.node_of[c.name]} (client {c.name})")
            self.node_seconds["evaluate"] += float(rec.get("seconds", 0.0))
            lines += json.loads(rec["lines"])
            for view, (y, prob) in unpack(rec["seen"]).items():
                ys.setdefault(view, []).append(y.numpy())
                probs.setdefault(view, []).append(prob.numpy())
        return lines + fedmed.pooled_lines(ys, probs, t, up_bytes, down_bytes, seconds)


def one_run_argv(argv: list, seed: int, holdout: list) -> list:
    """The command line a node builds this run from: run.py's, with --seeds S ... replaced
    by this run's --seed and --leave-one-out [NAMES] by this fold's --holdout-client."""
    out, i, loco = [], 0, False
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--seeds":
            while i < len(argv) and argv[i].lstrip("-").isdigit():
                i += 1
        elif a == "--leave-one-out" or a.startswith("--leave-one-out="):
            loco = True
            if a == "--leave-one-out" and i < len(argv) and not argv[i].startswith("-"):
                i += 1
        elif a != "--seed" or (i < len(argv) and not argv[i].lstrip("-").isdigit()):
            out.append(a)
        else:
            i += 1                                      # --seed S: given again below
    return out + ["--seed", str(seed)] + (["--holdout-client", ",".join(holdout)] if loco else [])


# A reply that Flower could not deliver (the node, or its upload, died mid-message): the
# client is lost for this message; its node is not taken for gone (on-dropout = wait sends
# the message to it again; if it is gone, the SuperLink says so after its heartbeats).
REPLY_LOST = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
              ErrorCode.CLIENT_APP_CRASHED)


def _claim(reply: Message):
    """The client a node's answer to "query" names (None: an error)."""
    return None if reply.has_error() else dict(reply.content[KEY]).get("client")


def _size(m: Message) -> int:
    """Bytes of a message's content as Flower serialises it (its records)."""
    try:
        return len(m.content.deflate()) + sum(len(r.deflate()) for r in m.content.values())
    except Exception:  # noqa: BLE001 - a message without content (an error reply)
        return 0


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """run.py's command line (run config `args`) with the clients on Flower nodes."""
    argv = shlex.split(str(context.run_config.get("args", "")))
    transport = FlowerTransport(grid, context.run_config)
    try:
        rc = cli.main(argv, transport=transport)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    print(f"flower: message bytes sent {transport.wire['sent']:,}, received "
          f"{transport.wire['received']:,}; seconds on the nodes in local_update "
          f"{transport.node_seconds['train']:.3f}, in evaluation "
          f"{transport.node_seconds['evaluate']:.3f}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    if rc:
        time.sleep(1)                                   # let Flower ship the last log lines
        raise SystemExit(rc)


# ---------------------------------------------------------------- the node side

def _state_dir(context: Context) -> str:
    default = os.environ.get("FEDMED_NODE_STATE", "~/.fedmed/flower-nodes")
    return os.path.expanduser(str(context.node_config.get("state-dir", default)))


_BUILT: dict = {}                      # one built run per process (see _built)


def _built(argv_json: str, data_dir: str | None, mine, settings: str = ""):
    """(algo, client records, federation, each client's state after setup) of the run
    whose command line is `argv_json`, with this node's data folder. `mine` (the node's
    client: its name or its index in clients + held-out clients): only that client's
    images are read, the others' pixels are zeros (datasets.pixels_of; with --dataset
    isic2019 the folder may hold this site's images only): a node with a `data-dir`, or
    with `isolate = true` in its node config. Else (`mine` None: a generated dataset
    without isolate, e.g. Flower's simulation runtime, whose processes each serve many
    virtual nodes) the whole federation is built once per process and shared by the
    nodes it serves; every other client's state is still out of reach (`Elsewhere`). A
    deployment starts a process per message, so this is built once per message there.
    `settings` (JSON {"args", "rounds"}): the method's arguments and rounds as the server's
    run has them, in place of those the command line gives where they differ (a
    protocol's phase, e.g. FCU's)."""
    key = (argv_json, data_dir, mine, settings)
    if key not in _BUILT:
        _BUILT.clear()
        argv = json.loads(argv_json)
        ns = cli.build_parser().parse_args(argv)
        given = cli.given_flags(cli.build_parser(), argv)
        if data_dir is not None and ns.dataset not in ("synthetic", "synthetic-multilabel"):
            ns.data_dir = data_dir
        ns.quiet, ns.decode_only = True, None if mine is None else (mine,)
        cfg, cls, args, _ = cli.configure(ns, given)
        if settings:
            want = json.loads(settings)
            cfg = dataclasses.replace(cfg, rounds=int(want["rounds"]))
            if args is not None:
                have = dataclasses.asdict(args)
                args = dataclasses.replace(args, **{
                    k: v for k, v in want["args"].items()
                    if json.dumps(have.get(k), default=fedmed._jsonable) != json.dumps(v)})
        fed = cli.load_federation(ns, cfg, cls, args)
        algo, cfg, clients, holdout, _ = fedmed.build(cfg, args, fed, ns.layer, quiet=True,
                                                      node=True)
        everyone = clients + holdout
        _BUILT[key] = (algo, everyone, fed, {c.name: copy.deepcopy(c.state) for c in everyone})
    return _BUILT[key]


class _Node:
    """This node's view of the run: the method built from the run's command line, the
    federation its data flags describe, and its own client (with its kept state)."""

    def __init__(self, msg: Message, context: Context):
        rec = msg.content[KEY]
        conf = context.node_config
        who = (f"client {conf['client']}" if "client" in conf else
               f"partition-id {conf['partition-id']}" if "partition-id" in conf else None)
        if who is None:
            raise fedmed.UsageError(f"node {context.node_id}: its --node-config names no client; "
                                    "give client=\"NAME\" or partition-id=K")
        self.who = f"node {context.node_id} ({who})"
        data_dir = conf.get("data-dir")
        if data_dir is not None:
            data_dir = os.path.expanduser(str(data_dir))
            if not os.path.isdir(data_dir):
                raise fedmed.UsageError(f"{self.who}: its data folder {data_dir} does not exist; "
                                        "fix data-dir in its --node-config")
        mine = str(conf["client"]) if "client" in conf else int(conf["partition-id"])
        isolate = data_dir is not None or str(conf.get("isolate", "")).lower() in ("1", "true")
        self.algo, clients, self.fed, setup = _built(rec["argv"], data_dir,
                                                     mine if isolate else None,
                                                     rec.get("settings", ""))
        if "client" in conf:
            mine = [c for c in clients if c.name == str(conf["client"])]
        else:
            k = int(conf["partition-id"])
            mine = clients[k:k + 1] if 0 <= k else []
        if not mine:
            raise fedmed.UsageError(f"{self.who}: the federation has no such client (its "
                                    f"clients: {', '.join(c.name for c in clients)})")
        self.client = mine[0]
        self.setup_state = setup[self.client.name]
        elsewhere(clients, self.algo.cfg.algo, f"on the node of client {self.client.name}",
                  keep=self.client)
        folder = os.path.join(_state_dir(context), str(rec["token"]))
        self.folder, self.stem = folder, fedmed._file_stem(self.client.name)
        self.origin = json.loads(rec["origin"]) if rec.get("origin") else None
        if self.origin:                          # (its start state takes these keys)
            self.origin["path"] = os.path.join(_state_dir(context), self.origin["token"],
                                               f"{self.stem}.r{self.origin['round']}.pt")

    def state_path(self, rnd: int) -> str:
        return os.path.join(self.folder, f"{self.stem}.r{rnd}.pt")

    def load_state(self, rnd: int) -> None:
        """client.state as it was after round `rnd` (0: as setup made it)."""
        if rnd == 0:
            self.client.state = copy.deepcopy(self.setup_state)
            if self.origin:                      # e.g. FCU's PGA: u's last local model
                path = self.origin["path"]
                if not os.path.isfile(path):
                    raise fedmed.UsageError(f"{self.who}: its state at the end of the run this "
                                            f"one starts from ({path}) is missing; start the "
                                            "node with the state-dir it had then")
                then = fedmed.load_checkpoint(path, self.who)["state"]
                lacks = [k for k in self.origin["keys"] if k not in then]
                if lacks:
                    raise fedmed.UsageError(f"{self.who}: its state at the end of the run this "
                                            f"one starts from ({path}) has no {lacks[0]}; "
                                            "rerun that run with this version")
                self.client.state.update({k: then[k] for k in self.origin["keys"]})
            return
        path = self.state_path(rnd)
        if not os.path.isfile(path):
            raise fedmed.UsageError(f"{self.who}: its state after round {rnd} ({path}) is "
                                    "missing; start the node with the state-dir it had")
        self.client.state = fedmed.load_checkpoint(path, self.who)["state"]

    def save_state(self, rnd: int, keep: int) -> None:
        """Write client.state after round `rnd`; delete the files of rounds other than
        `keep` (the state it started from, which a --resume may need again) and `rnd`."""
        os.makedirs(self.folder, exist_ok=True)
        fedmed.save_checkpoint({"state": self.client.state}, self.state_path(rnd))
        for n in os.listdir(self.folder):
            if n.startswith(self.stem + ".r") and n not in (os.path.basename(self.state_path(rnd)),
                                                             os.path.basename(self.state_path(keep))):
                try:
                    os.remove(os.path.join(self.folder, n))
                except FileNotFoundError:
                    pass


def _answer(fn):
    """A node's handler: FedMed's one-line errors travel back as such."""
    def handler(msg: Message, context: Context) -> Message:
        try:
            content = fn(msg, context)
        except (fedmed.UsageError, fedmed.Diverged) as e:
            content = _reply_error(e)
        return Message(content, reply_to=msg)
    handler.__name__ = fn.__name__
    return handler


client_app = ClientApp()


def _evaluating(node: _Node, rec) -> fedmed.ServerState:
    """Before an evaluation or a step (Algorithm.at_clients) on this node: its client's
    state as it was after round `state_round`, the round, every training client's private
    tensors where the server sent them (Algorithm.reads_every_private), the method's note
    on the client; returns the server state the message carries."""
    node.load_state(int(rec["state_round"]))
    node.algo.set_round(int(rec["round"]))
    if rec.get("privates"):
        got = unpack(rec["privates"])
        for c in node.algo.clients:
            if c is not node.client:
                c.state = {"private": got["all"][c.name]}
                node.algo.set_note(c, json.loads(got["notes"][c.name]))
    if "note" in rec:
        node.algo.set_note(node.client, json.loads(rec["note"]))
    return fedmed.ServerState(**fedmed.safe_torch_load(io.BytesIO(rec["server"])))


@client_app.query()
@_answer
def describe(msg: Message, context: Context) -> RecordDict:
    """Which client this node holds; refuses data whose split differs from the server's.
    With ask = "private": its client's private tensors after round `state_round`."""
    node = _Node(msg, context)
    rec = msg.content[KEY]
    if rec.get("ask") == "private":
        node.load_state(int(rec["state_round"]))
        return record(private=pack(node.client.state.get("private", {})))
    if rec.get("ask") == "step":                    # Algorithm.at_clients
        server = _evaluating(node, rec)
        level = node.algo
        for _ in range(int(rec["depth"])):
            level = level.base
        result = getattr(level, str(rec["step"]))(server, node.client, *unpack(rec["args"])["args"])
        return record(result=pack({"result": result}))
    want = json.loads(msg.content[KEY]["identity"]).get(node.client.name)
    have = fedmed.data_identity(node.fed)[node.client.name]
    if want != have:
        raise fedmed.UsageError(f"{node.who}: the images, labels or split of client "
                                f"{node.client.name} differ from the server's; give every "
                                "site the same data flags and code version")
    return record(client=node.client.name)


@client_app.train()
@_answer
def train(msg: Message, context: Context) -> RecordDict:
    """One local update of this node's client (the loop's broadcast -> local_update)."""
    node = _Node(msg, context)
    rec = msg.content[KEY]
    t, start = int(rec["round"]), int(rec["state_round"])
    node.load_state(start)
    node.algo.set_round(t)
    c = node.client
    node.algo.set_note(c, json.loads(rec["note"]))
    if rec.get("server"):                               # Algorithm.sends_server_state
        node.algo.at_node(fedmed.ServerState(**fedmed.safe_torch_load(io.BytesIO(rec["server"]))))
    t0 = time.perf_counter()
    upload = node.algo.local_update(c, unpack(rec["payload"]))
    seconds = time.perf_counter() - t0
    fedmed.check_private(t, c)
    node.save_state(t + 1, start)
    return record(upload=pack(upload), seconds=seconds, note=json.dumps(node.algo.note_of(c)))


@client_app.evaluate()
@_answer
def evaluate(msg: Message, context: Context) -> RecordDict:
    """This client's metric lines of the round with the aggregated server state, and its
    test labels and predicted probabilities (for the pooled line)."""
    node = _Node(msg, context)
    rec = msg.content[KEY]
    t = int(rec["round"])
    server = _evaluating(node, rec)
    t0 = time.perf_counter()
    lines, seen = fedmed.client_lines(node.algo, server, node.client, t, int(rec["up"]),
                                      int(rec["down"]))
    seconds = time.perf_counter() - t0
    seen = {v: (torch.from_numpy(y), torch.from_numpy(p)) for v, (y, p) in seen.items()}
    return record(lines=json.dumps(lines, default=fedmed._jsonable), seen=pack(seen),
                  seconds=seconds)


# ---------------------------------------------------------------- a local deployment

class LocalDeployment:
    """A SuperLink and one SuperNode per entry of `nodes` (each a node config dict, e.g.
    {"partition-id": 0, "state-dir": "..."}) as processes on this machine, on free
    localhost ports, with their own FLWR_HOME under `home`; `run` submits this checkout as
    a Flower app (`flwr run --stream`). For tests and bench/vs_flower.py; the README gives
    the same three commands for real sites."""

    def __init__(self, home: str, nodes: list, env: dict | None = None,
                 simulation: int = 0):
        """`simulation` = K > 0: no SuperNodes; the SuperLink runs Flower's simulation
        runtime with K virtual nodes (partition-id 0..K-1) on one CPU (needs ray:
        pip install "flwr[simulation]==1.42.*")."""
        import shutil
        self.home, self.nodes, self.simulation = os.path.abspath(home), nodes, simulation
        os.makedirs(self.home, exist_ok=True)
        here = os.path.dirname(sys.executable)
        self.bin = {n: (os.path.join(here, n) if os.path.exists(os.path.join(here, n))
                        else shutil.which(n) or n)
                    for n in ("flower-superlink", "flower-supernode", "flwr")}
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": os.path.join(self.home, "flwr"),
                    "PATH": here + os.pathsep + os.environ.get("PATH", "")}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.procs: dict = {}
        self.port = _free_port()

    def _spawn(self, key, argv) -> None:
        import subprocess
        log = open(os.path.join(self.home, f"{key}.log"), "ab")
        self.procs[key] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True)

    def start(self) -> "LocalDeployment":
        os.makedirs(self.env["FLWR_HOME"], exist_ok=True)
        with open(os.path.join(self.env["FLWR_HOME"], "config.toml"), "w") as f:
            f.write(f'[superlink]\ndefault = "local-fedmed"\n\n[superlink.local-fedmed]\n'
                    f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._spawn("superlink", [self.bin["flower-superlink"], "--insecure", "--host",
                                  "127.0.0.1", "--port", str(self.port), "--database",
                                  ":flwr-in-memory:"]
                    + (["--simulation"] if self.simulation else []))
        _wait_port(self.port, 60)
        for k in range(len(self.nodes)):
            self.start_node(k)
        return self

    def start_node(self, k: int) -> None:
        conf = " ".join(f"{key}={json.dumps(v)}" for key, v in self.nodes[k].items())
        self._spawn(f"node{k}", [self.bin["flower-supernode"], "--insecure", "--superlink",
                                 f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                                 "--node-config", conf])

    def kill_node(self, k: int) -> None:
        """SIGKILL node k's SuperNode and whatever ClientApp it is running."""
        import signal
        p = self.procs.pop(f"node{k}")
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def run(self, args: str, app: str | None = None, timeout: float = 600, **config):
        """`flwr run APP --stream` with run config args=ARGS (+ `config`); returns the
        CompletedProcess (its output is the server's log)."""
        import subprocess
        conf = " ".join(f"{k}={json.dumps(v)}" for k, v in {"args": args, **config}.items())
        app = app or os.path.dirname(os.path.abspath(__file__))
        sim = (["--federation-config", f"num_supernodes={self.simulation} "
                "client_resources_num_cpus=1 init_args_num_cpus=1"] if self.simulation else [])
        return subprocess.run([self.bin["flwr"], "run", app, "local-fedmed", "--stream",
                               "--run-config", conf, *sim], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def log(self, key: str) -> str:
        with open(os.path.join(self.home, f"{key}.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        import signal
        for key in list(self.procs):
            p = self.procs.pop(key)
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, OSError):
                pass
            except Exception:  # noqa: BLE001 - did not stop in time
                os.killpg(p.pid, signal.SIGKILL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    import socket
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


if __name__ == "__main__":
    print(__doc__.split("\n\n")[1])
