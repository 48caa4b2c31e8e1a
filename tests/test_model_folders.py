"""Hostile and broken model folders (`variants.load_any` and the CLI's `--model`): pickle weights are refused
unless allowed, and then read only through torch's weights_only loader; a truncated safetensors file, a config
without `architectures`, a missing tokenizer and code shipped with a model are one line, naming the file; and a
model is placed with `device_map` / `n_devices`. Every folder is built here from a tiny random GPT-2; nothing is
downloaded (`offline`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poslens.variants import load_any

TOKENS = torch.tensor([[1, 5, 9, 4, 30, 12, 7, 60]])


@pytest.fixture(autouse=True)
def no_network(offline):
    """Every test here runs offline."""


@pytest.fixture
def gpt2_folder(tiny_hf, word_tokenizer, tmp_path):
    """`gpt2_folder(name)`: a fresh save_pretrained folder of the same tiny GPT-2, with its tokenizer."""

    def make(name: str) -> Path:
        folder = tmp_path / name
        tiny_hf("gpt2").save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        return folder

    return make


class Planted:
    """A pickle that, when unpickled by a full `pickle.load`, writes the file named in it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def pickle_folder(folder: Path, payload=None) -> Path:
    """Turn a save_pretrained folder into one whose only weights are `pytorch_model.bin` (its state dict, or
    `payload`)."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights if payload is None else payload, folder / "pytorch_model.bin")
    return folder


def edit_config(folder: Path, **changes) -> Path:
    record = json.loads((folder / "config.json").read_text())
    record.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    return folder


def test_pickle_weights_are_refused_unless_allowed_and_then_only_through_weights_only(gpt2_folder, tmp_path):
    reference = load_any(gpt2_folder("safe"))
    folder = pickle_folder(gpt2_folder("pickled"))
    with pytest.raises(ValueError, match=rf"{folder}/pytorch_model.bin is a pickle file, which can run code when it "
                                         r"is loaded; .* pass allow_pickle=True \(poslens: --allow-pickle\)"):
        load_any(folder)
    allowed = load_any(folder, allow_pickle=True)  # the user's explicit choice: plain tensors load
    torch.testing.assert_close(allowed(TOKENS), reference(TOKENS), atol=0, rtol=0)

    marker = tmp_path / "pwned.txt"
    hostile = pickle_folder(gpt2_folder("hostile"), payload={"transformer.wte.weight": Planted(marker)})
    with open(tmp_path / "probe.pkl", "wb") as handle:  # the payload is live: a full unpickle would run it
        pickle.dump(Planted(tmp_path / "live.txt"), handle)
    with open(tmp_path / "probe.pkl", "rb") as handle:
        pickle.load(handle)
    assert (tmp_path / "live.txt").exists()
    with pytest.raises(ValueError, match="is a pickle file"):
        load_any(hostile)
    with pytest.raises(ValueError, match=rf"could not load {hostile}: Weights only load failed"):
        load_any(hostile, allow_pickle=True)  # even when allowed, weights_only refuses to run it
    assert not marker.exists()

    both = gpt2_folder("both")  # safetensors beside a hostile pickle: the safetensors are loaded, the pickle never
    (both / "pytorch_model.bin").write_bytes((hostile / "pytorch_model.bin").read_bytes())
    torch.testing.assert_close(load_any(both)(TOKENS), reference(TOKENS), atol=0, rtol=0)
    assert not marker.exists()


def test_broken_folders_are_one_clear_error(gpt2_folder, tmp_path):
    truncated = gpt2_folder("truncated")
    payload = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ValueError, match=rf"{truncated}/model.safetensors is not a valid safetensors file \(truncated "
                                         r"or corrupted\?\)"):
        load_any(truncated)

    no_tokenizer = gpt2_folder("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(ValueError, match=rf"{no_tokenizer} has no tokenizer files .* pass tokenizer="):
        load_any(no_tokenizer)

    inferred = edit_config(gpt2_folder("no-architectures"), architectures=None)  # the bridge infers it from gpt2
    assert load_any(inferred).cfg.n_layers == 2
    unknown = edit_config(gpt2_folder("unknown"), architectures=None, model_type="no-such-type")
    with pytest.raises(ValueError, match=rf"could not load {unknown}: The checkpoint you are trying to load has model "
                                         "type `no-such-type`"):
        load_any(unknown)

    no_weights = gpt2_folder("no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model weights: expected model.safetensors"):
        load_any(no_weights)
    sharded = gpt2_folder("sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors does not exist, but the folder's "
                                                "model.safetensors.index.json lists it"):
        load_any(sharded)


def write_remote_code(folder: Path, marker: Path) -> Path:
    """Make `folder` a model that needs the code it ships (`auto_map`), which writes `marker` when it runs."""
    edit_config(folder, model_type="shipped", architectures=["ShippedForCausalLM"],
                auto_map={"AutoConfig": "configuration_shipped.ShippedConfig",
                          "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"})
    (folder / "configuration_shipped.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('shipped code ran')\n"
        "from transformers import GPT2Config\n\n\nclass ShippedConfig(GPT2Config):\n    model_type = 'shipped'\n")
    (folder / "modeling_shipped.py").write_text(
        "from transformers import GPT2LMHeadModel\n\nfrom .configuration_shipped import ShippedConfig\n\n\n"
        "class ShippedForCausalLM(GPT2LMHeadModel):\n    config_class = ShippedConfig\n")
    return folder


def test_code_shipped_with_a_model_runs_only_when_trusted_and_that_is_said(gpt2_folder, tmp_path, monkeypatch,
                                                                           run_cli):
    import transformers.dynamic_module_utils as modules

    monkeypatch.setattr(modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the code
    marker = tmp_path / "ran.txt"
    folder = write_remote_code(gpt2_folder("remote"), marker)
    with pytest.raises(ValueError, match=r"it ships Python code that must run to build the model .* pass "
                                         r"trust_remote_code=True \(poslens: --trust-remote-code\)"):
        load_any(folder)
    code, out, err = run_cli("inspect", "--model", str(folder))
    assert code == 2 and err.count("\n") == 1 and "--trust-remote-code" in err and out == "" and not marker.exists()
    code, out, err = run_cli("inspect", "--model", str(folder), "--trust-remote-code")
    assert out.startswith(f"note: --trust-remote-code is on: Python code shipped with {folder} may run\n")
    assert marker.exists()  # the explicit option let it run (the bridge then has no adapter for it: one line)
    assert code == 2 and err.count("\n") == 1 and len(err) < 500  # the bridge's list of every architecture is cut


@pytest.mark.parametrize("case", ["pickle", "truncated", "no-tokenizer", "unknown-type", "no-tokenizer-folder"])
def test_every_model_error_of_the_cli_is_one_line(case, gpt2_folder, tmp_path, run_cli):
    folder = gpt2_folder(case)
    extra: tuple[str, ...] = ()
    if case == "pickle":
        pickle_folder(folder)
    elif case == "truncated":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    elif case == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer_config.json").unlink()
    elif case == "unknown-type":
        edit_config(folder, architectures=None, model_type="no-such-type")
    else:
        extra = ("--tokenizer", str(tmp_path / "nowhere"))
    named = {"pickle": "pytorch_model.bin", "truncated": "model.safetensors", "no-tokenizer": str(folder),
             "unknown-type": "no-such-type", "no-tokenizer-folder": "nowhere"}[case]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 92}" for i in range(100)))
    for argv in (("inspect",), ("probe", "--random-tokens", "--out", str(tmp_path / "p.csv"), "--quiet"),
                 ("demo", "--port", "0", "--quiet")):
        code, _, err = run_cli(argv[0], "--model", str(folder), *extra, *argv[1:])
        assert code == 2 and err.startswith(f"poslens {argv[0]}: error: ") and err.count("\n") == 1, (argv, err)
        assert named in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "p.csv").exists()


def test_a_model_is_placed_with_a_device_map(gpt2_folder, tiny_hf, trained_runs, run_cli):
    folder = gpt2_folder("placed")
    reference = load_any(folder)(TOKENS)
    for device_map in ("cpu", {"": "cpu"}):
        model = load_any(folder, device_map=device_map)
        assert str(model.cfg.device) == "cpu"
        torch.testing.assert_close(model(TOKENS), reference, atol=0, rtol=0)
    code, out, err = run_cli("inspect", "--model", str(folder), "--device-map", '{"": "cpu"}')
    assert code == 0 and "| placed | 0 | 0 | learned |" in out, err
    refusals = [
        (lambda: load_any(folder, device="cpu", device_map="cpu"), "give either device= or device_map=, not both"),
        (lambda: load_any(folder, n_devices=0), "n_devices must be an integer >= 1, got 0"),
        (lambda: load_any(trained_runs[("nope-causal", 2)], device_map="cpu"),
         "is a poslens run: it loads on one device \\(device=\\), not with device_map="),
        (lambda: load_any(tiny_hf("gpt2"), device_map="cpu"), "device_map= applies to a model loaded from a folder"),
    ]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message):
            call()
    code, _, err = run_cli("inspect", "--model", str(folder), "--device-map", "{not json")
    assert code == 2 and err.startswith("poslens inspect: error: --device-map {not json is not a JSON object")
    code, _, err = run_cli("demo", "--device-map", "cpu", "--port", "0")
    assert code == 2 and "--device-map go with --model SPEC" in err
    code, _, err = run_cli("probe", str(trained_runs[("nope-causal", 2)]), "--allow-pickle", "--out", "x.csv")
    assert code == 2 and "--allow-pickle go with --model SPEC" in err
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=rf"could not load {folder}: n_devices=2 requires"):
            load_any(folder, n_devices=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_is_placed_on_cuda_with_a_device_map_or_n_devices(gpt2_folder):
    folder = gpt2_folder("gpu")
    reference = load_any(folder)(TOKENS)
    for options in ({"device_map": {"": "cuda:0"}}, {"device_map": "auto"}, {"n_devices": 1}):
        model = load_any(folder, **options)
        assert str(model.cfg.device).startswith("cuda"), options
        torch.testing.assert_close(model(TOKENS.cuda()).cpu(), reference, atol=1e-4, rtol=1e-4)


def test_hub_errors_stay_one_line_offline(run_cli):
    code, _, err = run_cli("inspect", "--model", "nobody/no-such-model")
    assert code == 2 and err.count("\n") == 1 and "could not load 'nobody/no-such-model'" in err
