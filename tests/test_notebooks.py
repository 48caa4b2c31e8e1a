"""The demo notebooks run end to end in a real Jupyter kernel and show what their text says.

Each notebook is executed with nbclient exactly as committed; any cell that raises fails the
test. One extra cell is then run in the same kernel to read back the notebook's own results
as JSON, and those are checked against what the notebook's text claims (things that would
break if the library or the training recipe broke), beside the outputs a reader sees
(the printed headline table, the plotly figures).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

for _module in ("nbformat", "nbclient", "ipykernel"):
    pytest.importorskip(_module, reason=f"the notebook tests need {_module}: pip install -e '.[test]'")
import nbformat  # noqa: E402 -- imported after the importorskip above names what is missing
from ipykernel.kernelspec import write_kernel_spec  # noqa: E402 -- likewise
from nbclient import NotebookClient  # noqa: E402 -- likewise

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

DEMOS = Path(__file__).resolve().parents[1] / "demos"
CELL_TIMEOUT_S = 600
PLOTLY_MIME = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A `python3` kernelspec that runs this interpreter (where poslens is installed). Directories
    on JUPYTER_PATH are searched before the user's and the environment's, so a stale user-level
    `python3` kernel pointing at another Python cannot be picked instead."""
    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3")
    return os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))


def outputs_with(cells: list, mime: str) -> list:
    """The display outputs of `cells` that carry `mime` (what a front end would render)."""
    return [output for cell in cells for output in cell.outputs if mime in output.get("data", {})]


def stdout_text(cells: list) -> str:
    """Everything `cells` printed to stdout, in order."""
    return "".join(output["text"] for cell in cells for output in cell.outputs
                   if output.output_type == "stream" and output.name == "stdout")


def run_notebook(name: str, readout: str, tmp_path: Path, monkeypatch, jupyter_path: str) -> tuple[list, dict]:
    """Execute `demos/<name>` in a fresh kernel (cwd and TMPDIR in `tmp_path`, so the notebook's
    temporary run folders are cleaned up with it), then `readout`, a cell that prints one JSON
    object. Returns the notebook's own code cells (with outputs) and the parsed readout."""
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(DEMOS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name} is committed with outputs; clear them"
    notebook.cells.append(nbformat.v4.new_code_cell(readout))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    *cells, readout_cell = [cell for cell in notebook.cells if cell.cell_type == "code"]
    return cells, json.loads(stdout_text([readout_cell]))


PROBING_READOUT = """
import json
accuracy = table[(table["probe"] == "position") & (table["metric"] == "accuracy")]
print(json.dumps({
    "kernel_python": __import__("sys").executable,
    "accuracy": {f"{row.variant}|{row.site}|{row.baseline}": row.value for row in accuracy.itertuples()},
    "invariance": invariance[["variant", "weights", "n_layers", "invariant"]].to_dict("records"),
    "sites": capture.sites,
    "leading_digits": sorted(set(probe_tokens[:, 0].tolist())),
}))
"""


def test_probing_notebook(tmp_path, monkeypatch, jupyter_path):
    cells, result = run_notebook("probing.ipynb", PROBING_READOUT, tmp_path, monkeypatch, jupyter_path)
    assert result["kernel_python"] == sys.executable
    # probed on a seeded random draw of held-out sums (task.sample_test), not the first rows of the sorted test set,
    # whose first operands all start with 0..3
    assert result["leading_digits"] == list(range(10))

    header = ("| site | nope-causal | nope-causal (random init) | learned-causal | learned-causal (random init) "
              "| token identity | chance |")
    printed = stdout_text(cells)
    assert header in printed
    assert all(f"| {site} |" in printed for site in result["sites"])
    assert len(outputs_with(cells, PLOTLY_MIME)) == 2  # probe accuracy by layer, |corr| heatmap

    # The symmetry theorem, as the invariance table reports it (random weights, then trained).
    invariant = {(row["variant"], row["n_layers"], row["weights"] == "random"): row["invariant"]
                 for row in result["invariance"]}
    assert invariant == {
        ("nope-bidirectional", 1, True): True, ("nope-bidirectional", 2, True): True,
        ("nope-causal", 1, True): True, ("nope-causal", 2, True): False,
        ("learned-causal", 1, True): False, ("learned-causal", 2, True): False,
        ("nope-causal", 2, False): False, ("learned-causal", 2, False): False,
    }

    accuracy = result["accuracy"]
    token_identity = accuracy["nope-causal|embed|token_identity"]
    assert accuracy["nope-causal|embed|chance"] == pytest.approx(1 / 12)
    assert 1 / 12 < token_identity < 0.5
    # NoPE's embedding is token identity and nothing else; a learned embedding is position.
    assert accuracy["nope-causal|embed|trained"] == pytest.approx(token_identity, abs=0.02)
    assert accuracy["learned-causal|embed|trained"] >= 0.99
    # One causal attention layer writes position in, and training adds to what the mask gives.
    after_attention = "nope-causal|blocks.0.hook_resid_mid"
    assert accuracy[f"{after_attention}|trained"] > token_identity + 0.3
    assert accuracy[f"{after_attention}|trained"] > accuracy[f"{after_attention}|random_init"] + 0.1


PATCHING_READOUT = """
import json
import urllib.error
import urllib.request


def demo_status(host, path=""):
    request = urllib.request.Request(demo_url + path, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


print(json.dumps({
    "demo_url": demo_url,
    "demo_page": demo_status(demo_url.split("/")[2]),
    "demo_layout": demo_status("localhost", "_dash-layout"),
    "demo_foreign": demo_status("evil.example"),
    "exact_match": result.history[-1]["exact_match"],
    "roles": task.roles,
    "swap": list(SWAP),
    "patch": patch.to_dict("records"),
    "swap_at_embed": swaps.iloc[0].to_dict(),
    "cuts": cuts.to_dict("records"),
    "attribution_labels": labels,
    "leading_digits": sorted(set(sequences[:, 1].tolist())),
}))
"""


def test_patching_notebook(tmp_path, monkeypatch, jupyter_path):
    cells, result = run_notebook("patching.ipynb", PATCHING_READOUT, tmp_path, monkeypatch, jupyter_path)
    assert result["exact_match"] >= 0.9  # the text says the model gets about 99% of sums right
    assert result["leading_digits"] == list(range(10))  # task.sample_test, not the sorted test set's first rows

    # The demo shown inline: an iframe of the app the kernel serves, hardened like `poslens demo`.
    (frame,) = [output["data"]["text/html"] for output in outputs_with(cells, "text/html")
                if "<iframe" in output["data"]["text/html"]]
    assert f'src="{result["demo_url"]}"' in frame
    assert result["demo_page"][0] == 200 and "_dash-config" in result["demo_page"][1]
    assert result["demo_layout"][0] == 200 and '"37+25="' in result["demo_layout"][1]
    assert result["demo_foreign"][0] == 403 and "refused" in result["demo_foreign"][1]
    assert len(outputs_with(cells, PLOTLY_MIME)) == 4  # two patching heatmaps, the attribution preview, residual cuts

    roles, patch = result["roles"], result["patch"]
    n_layers = 1 + max(row["layer"] for row in patch)
    assert n_layers == 2 and {row["site"] for row in patch} == {"resid_pre", "resid_mid", "resid_post", "attn_out",
                                                                "mlp_out"}
    x1, x0 = result["swap"]
    assert (roles[x1], roles[x0]) == ("x1", "x0")

    def value(site: str, layer: int, position: int) -> float:
        (row,) = [r for r in patch if (r["site"], r["layer"], r["position"]) == (site, layer, position)]
        return row["value"]

    # At the embedding the runs differ only at the swapped columns, and the units column carries the answer.
    assert value("resid_pre", 0, x0) > 0.5
    positions = sorted({row["position"] for row in patch})
    assert all(value("resid_pre", 0, p) == 0 for p in positions if p not in (x1, x0))
    # After the last attention, only the last prompt position feeds its logits: patching it is the clean run.
    equals = roles.index("=")
    assert value("resid_mid", n_layers - 1, equals) == pytest.approx(1, abs=1e-4)
    assert positions[-1] == equals
    assert all(abs(value("resid_mid", n_layers - 1, p)) < 1e-6 for p in positions[:-1])

    # A NoPE embedding is the token's: exchanging two columns there is exchanging the digits.
    assert result["swap_at_embed"]["site"] == "embed" and result["swap_at_embed"]["follows_swap"] == 1.0

    cuts = result["cuts"]
    assert len(cuts) == 1 + 3 * n_layers and cuts[0]["sublayer"] == "none" and cuts[0]["delta_exact_match"] == 0
    assert min(row["delta_exact_match"] for row in cuts) < -0.5  # some residual connection is indispensable
    assert result["attribution_labels"] == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
