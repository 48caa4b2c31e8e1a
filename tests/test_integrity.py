"""A checkpoint's config is verified with its weights (an edited config.json is refused by name, restamp records the
digest of older runs), and a run's measures cache is bound to its weights, the analysis version and its own files:
a cache that belongs to other weights, another version, or was edited is computed again, never read."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from poslens.analyses.runs import STAMP, TENSORS, cached_results
from poslens.variants import load, train
from poslens.variants.checkpoint import checkpoint_digest
from poslens.variants.training import list_snapshots, restamp_run

SHORT = {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 4, "checkpoint_every": 2, "quiet": True}


@pytest.fixture
def run(tiny, addition, tmp_path):
    """`run(name, seed=0, **settings)`: a briefly trained tiny run directory."""

    def make(name: str = "run", seed: int = 0, **settings):
        out = tmp_path / name
        train(tiny("nope-causal", seed=seed), addition, out_dir=out, seed=seed, **{**SHORT, **settings})
        return out

    return make


def edit(path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_an_edited_config_is_refused_by_name(run, run_cli, tiny, addition):
    """The issue's case: attention_dir causal → bidirectional in a trained run's config.json made `poslens
    invariance` load a different model and report it invariant. Now the edit is refused, naming the file."""
    out = run()
    config = out / "config.json"
    original = config.read_text()
    config.write_text(json.dumps(json.loads(original), indent=4, sort_keys=False))  # reformatted, not edited
    assert load(out) is not None
    edit(config, lambda record: record["config"].update(attention_dir="bidirectional"))
    with pytest.raises(ValueError, match=rf"{config} was edited after it was saved: its contents do not match the "
                                         "sha256 recorded in it"):
        load(out)
    code, out_text, err = run_cli("invariance", "--checkpoint", str(out))
    assert code == 2 and out_text == "" and err.count("\n") == 1 and f"{config} was edited after it was saved" in err
    code, _, err = run_cli("restamp", str(out))  # a recorded digest is checked, never replaced
    assert code == 2 and "was edited after it was saved" in err
    train(tiny("nope-causal"), addition, out_dir=out, resume=True, **SHORT)  # resuming rewrites it from the state
    assert json.loads(config.read_text()) == json.loads(original) and load(out) is not None


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object with format 1 and a config, found a JSON array"),
    ('"config"', "found a JSON string"),
    ('{"format": 2, "config": {}}', "found format 2"),
    ('{"format": 1, "config": [1, 2], "weights_sha256": "x", "sha256": "y"}',
     "its config must be a JSON object, found a JSON array"),
])
def test_a_config_of_the_wrong_json_type_is_one_line(run, run_cli, content, message):
    out = run()
    (out / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load(out)
    for argv in (("invariance", "--checkpoint", str(out)), ("restamp", str(out)), ("inspect", "--model", str(out))):
        code, _, err = run_cli(*argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(out) in err, argv


def test_restamp_records_the_config_digest_of_older_runs_and_their_snapshots(run, run_cli):
    out = run(snapshots=2)
    checkpoints = [out, *(path for _, path in list_snapshots(out))]
    assert len(checkpoints) == 4
    for path in checkpoints:  # as the poslens before this digest wrote them: the weights digest only
        edit(path / "config.json", lambda record: record.pop("sha256"))
    with pytest.raises(ValueError, match=r"records no sha256 of its config and weights .* `poslens restamp "):
        load(checkpoints[2])
    code, text, _ = run_cli("restamp", str(out))
    assert code == 0 and text.count("recorded the digests of config and weights in") == 4
    assert all(load(path) is not None for path in checkpoints) and restamp_run(out) == []


class Counted:
    """A measure of a run's weights (a table and a tensor), counting how often it is computed."""

    def __init__(self, out):
        self.out, self.calls = out, 0

    def __call__(self):
        self.calls += 1
        weights = load(self.out).W_E.detach()
        return {"sums": pd.DataFrame({"row": range(3), "sum": weights[:3].sum(-1).double().numpy()}),
                "embed": weights}


def test_the_measures_cache_belongs_to_the_weights_beside_it_and_is_never_read_edited(run, tmp_path):
    first, second = run("a", seed=0), run("b", seed=1)
    stamp = {"preset": "tiny", "version": 1}
    measure = Counted(first)
    fresh = cached_results(first / "measures", stamp, measure, weights=first)
    again = cached_results(first / "measures", stamp, measure, weights=first)
    assert measure.calls == 1 and again["sums"].equals(fresh["sums"]) and torch.equal(again["embed"], fresh["embed"])

    def recomputed(out, change=None, **options):
        """Run the cache of `out` after `change`; whether it was computed again, and its results."""
        if change is not None:
            change(out / "measures")
        counted = Counted(out)
        results = cached_results(out / "measures", options.pop("stamp", stamp), counted, weights=out, **options)
        expected = counted() if counted.calls == 1 else Counted(out)()
        assert results["sums"].equals(expected["sums"]) and torch.equal(results["embed"], expected["embed"])
        return counted.calls == 2

    shutil.copytree(first / "measures", second / "measures")  # a cache beside weights it was not made from
    assert recomputed(second)
    assert not recomputed(second)  # ... now it is theirs
    table = first / "measures" / "sums.json"
    assert recomputed(first, lambda _: edit(table, lambda record: record["data"][1].update(sum=123.0)))
    assert recomputed(first,
                      lambda folder: (folder / TENSORS).write_bytes((second / "measures" / TENSORS).read_bytes()))
    assert recomputed(first, lambda folder: edit(folder / STAMP, lambda record: record["stamp"].update(preset="x")))
    assert recomputed(first, lambda folder: edit(folder / STAMP, lambda record: record.pop("files")))
    assert recomputed(first, lambda folder: (folder / STAMP).write_text("{broken"))
    assert recomputed(first, stamp={**stamp, "version": 2})  # another analysis version
    assert not recomputed(first, stamp={**stamp, "version": 2})
    assert recomputed(first, stamp={**stamp, "version": 2}, force=True)

    with pytest.raises(ValueError, match="names no analysis version"):
        cached_results(first / "measures", {"preset": "tiny"}, measure, weights=first)
    edit(first / "config.json", lambda record: record["config"].update(attention_dir="bidirectional"))
    with pytest.raises(ValueError, match=rf"{first / 'config.json'} was edited"):
        cached_results(first / "measures", {**stamp, "version": 2}, measure, weights=first)
    with pytest.raises(ValueError, match="was edited"):
        checkpoint_digest(first)
