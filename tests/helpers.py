"""Small helpers shared by the test files (imported as `helpers`: pytest puts tests/ on
sys.path)."""
import json


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(s) for s in f]


def drop_seconds(obj):
    """The same record without its wall-clock fields (the only ones allowed to differ
    between two runs of one seed)."""
    if isinstance(obj, dict):
        return {k: drop_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [drop_seconds(v) for v in obj]
    return obj
