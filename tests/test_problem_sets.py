"""Problem-set TOML loader, expansion to Problems, malformed files, and `lutforge problems`."""
import pytest
from click.testing import CliRunner

import problem_sets as PS
from kernels.problem import Problem
from sweep.cli import main


def test_shipped_sets_and_sizes():
    assert PS.list_sets() == ["dit", "fallback_train", "heldout", "llm", "moe", "qk_norm", "wan_vae", "wan_vae_decoder"]
    wan = PS.load("wan_vae")
    assert len(wan.shapes) == 8 * 5 and not wan.per_head
    assert {c for _, c, _ in wan.shapes} == {64, 128, 160, 256, 320, 512, 640, 1024}
    assert {t for t, _, _ in wan.shapes} == {1560, 6240, 24960, 99840, 399360}
    llm = PS.load("llm")
    assert len(llm.shapes) == 10 * 16
    assert sorted({t for t, _, _ in llm.shapes}) == [2**k for k in range(16)]
    qk = PS.load("qk_norm")
    assert qk.per_head and len(qk.shapes) == 3 * 4 * 5
    assert {c for _, c, _ in qk.shapes} == {64, 128, 256} and {h for _, _, h in qk.shapes} == {8, 16, 32, 64}
    dit = PS.load("dit")
    assert {c for _, c, _ in dit.shapes} == {3072, 5120} and all(h == 1 for _, _, h in dit.shapes)
    for name in PS.list_sets():
        s = PS.load(name)
        assert s.name == name and s.description and len(set(s.shapes)) == len(s.shapes)


def test_channel_first_set_is_every_recorded_decoder_norm_shape():
    from kernels.channel_first import ChannelFirstProblem
    from kernels.wan_vae_norm_shapes import WAN_VAE_NORM_SHAPES

    s = PS.load("wan_vae_decoder")
    assert s.family == "channel_first"
    recorded = {(C, N, S) for shapes in WAN_VAE_NORM_SHAPES.values() for C, _T, _H, _W, _l, N, S, _n in shapes}
    assert set(s.shapes) == recorded
    probs = PS.problems("wan_vae_decoder", "cf_l2norm_silu", "bf16", "bf16")
    assert len(probs) == len(recorded) and all(isinstance(p, ChannelFirstProblem) and p.silu and p.l2norm
                                               for p in probs)
    with pytest.raises(ValueError, match="channel-first op but set 'wan_vae' is a row set"):
        PS.problems("wan_vae", "cf_l2norm_silu", "bf16", "bf16")
    with pytest.raises(ValueError, match="row op but set 'wan_vae_decoder' is a channel-first set"):
        PS.problems("wan_vae_decoder", "rmsnorm", "bf16", "bf16")


def test_channel_first_set_files_are_validated(tmp_path):
    (tmp_path / "bad.toml").write_text('description = "x"\n[channel_first]\nshapes = [[96, 1]]\n')
    with pytest.raises(ValueError, match=r"\[C, N, S\] integers"):
        PS.load("bad", tmp_path)
    (tmp_path / "both.toml").write_text('description = "x"\n[axes]\nhidden = [1]\ntokens = [1]\n'
                                        '[channel_first]\nshapes = [[96, 1, 8]]\n')
    with pytest.raises(ValueError, match="not both"):
        PS.load("both", tmp_path)


def test_problems_expansion():
    probs = PS.problems("wan_vae", "fused_rmsnorm_silu", "bf16", "nvfp4")
    assert len(probs) == 40 and all(isinstance(p, Problem) for p in probs)
    assert probs[0] == Problem("fused_rmsnorm_silu", T=1560, C=64, in_dtype="bf16", out_format="nvfp4")
    qk = PS.problems("qk_norm", "qk_rmsnorm", "fp16", "fp16")
    assert qk[0] == Problem("qk_rmsnorm", T=1, C=64, in_dtype="fp16", out_format="fp16", heads=8)
    sw = PS.problems("llm", "rmsnorm_fp4quant", "bf16", "mxfp4", scale_layout="swizzled")
    assert len(sw) == 160 and all(p.scale_layout == "swizzled" for p in sw)


def test_problems_rejects_mismatched_kinds_and_bad_combinations():
    with pytest.raises(ValueError, match="per-head op but set 'llm' is a row set"):
        PS.problems("llm", "qk_rmsnorm", "bf16", "bf16")
    with pytest.raises(ValueError, match="row op but set 'qk_norm' is a per-head set"):
        PS.problems("qk_norm", "rmsnorm", "bf16", "bf16")
    with pytest.raises(ValueError, match="unknown op"):
        PS.problems("llm", "layernorm", "bf16", "bf16")
    with pytest.raises(ValueError, match="out formats"):  # Problem's own validation
        PS.problems("llm", "rmsnorm", "bf16", "fp8")
    with pytest.raises(ValueError, match="unknown problem set 'nope'; known: dit, fallback_train, heldout, llm"):
        PS.load("nope")
    with pytest.raises(ValueError, match="unknown problem set"):
        PS.load("../problem_sets/llm")


GOOD = 'description = "d"\n[axes]\nhidden = [64]\ntokens = [1, 2]\n'


@pytest.mark.parametrize("text, match", [
    ('description = "d"\n[axes\n', "bad.toml: not valid TOML"),
    ('[axes]\nhidden = [64]\ntokens = [1]\n', "bad.toml: description"),
    ('description = ""\n[axes]\nhidden = [64]\ntokens = [1]\n', "bad.toml: description"),
    ('description = "d"\naxes = 3\n', "bad.toml: axes must be a table"),
    ('description = "d"\n[axes]\nhidden = [64]\n', r"bad.toml: axes must be exactly \{hidden, tokens\}"),
    ('description = "d"\n[axes]\nhidden = [64]\ntokens = [1]\nheads = [8]\n', "bad.toml: axes must be exactly"),
    ('description = "d"\n[axes]\nhidden = []\ntokens = [1]\n', "bad.toml: axes.hidden must be a non-empty list"),
    ('description = "d"\n[axes]\nhidden = 64\ntokens = [1]\n', "bad.toml: axes.hidden must be a non-empty list"),
    ('description = "d"\n[axes]\nhidden = [64.0]\ntokens = [1]\n', r"bad.toml: axes.hidden must hold integers >= 1"),
    ('description = "d"\n[axes]\nhidden = [64]\ntokens = [0]\n', r"bad.toml: axes.tokens must hold integers >= 1"),
    ('description = "d"\n[axes]\nhidden = [64]\ntokens = [true]\n', r"bad.toml: axes.tokens must hold integers"),
    ('description = "d"\n[axes]\nhidden = [64, 64]\ntokens = [1]\n', "bad.toml: axes.hidden has duplicate"),
    ('description = "d"\n[axes]\nhead_dim = [64]\nheads = [-1]\ntokens = [1]\n', r"bad.toml: axes.heads must hold"),
    ('extra = 1\n' + GOOD, r"bad.toml: unknown field\(s\) \['extra'\]"),
])
def test_malformed_files_name_file_and_field(tmp_path, text, match):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=match):
        PS.load("bad", tmp_path)


def test_custom_directory(tmp_path):
    (tmp_path / "mine.toml").write_text(GOOD)
    (tmp_path / "heads.toml").write_text('description = "h"\n[axes]\nhead_dim = [128]\nheads = [2, 4]\ntokens = [3]\n')
    assert PS.list_sets(tmp_path) == ["heads", "mine"]
    assert PS.load("mine", tmp_path).shapes == [(1, 64, 1), (2, 64, 1)]
    assert PS.load("heads", tmp_path).shapes == [(3, 128, 2), (3, 128, 4)]
    assert len(PS.problems("mine", "rmsnorm", "bf16", "bf16", directory=tmp_path)) == 2
    with pytest.raises(ValueError, match="does not exist"):
        PS.list_sets(tmp_path / "missing")


def test_cli_lists_sets_and_shapes():
    runner = CliRunner()
    res = runner.invoke(main, ["problems"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["set", "shapes", "kind"]
    assert any(line.split()[:3] == ["wan_vae", "40", "rows"] for line in lines)
    assert any(line.split()[:3] == ["qk_norm", "60", "per-head"] for line in lines)

    res = runner.invoke(main, ["problems", "wan_vae"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1].split() == ["tokens", "hidden"]
    assert "1560    64" in res.output and res.output.rstrip().endswith("40 shapes")

    res = runner.invoke(main, ["problems", "qk_norm"])
    assert res.exit_code == 0
    assert res.output.splitlines()[1].split() == ["tokens", "heads", "head_dim", "rows"]
    assert "32768   64     256       2097152" in res.output

    res = runner.invoke(main, ["problems", "nope"])
    assert res.exit_code == 2
    assert "unknown problem set 'nope'" in res.output and "Traceback" not in res.output


def test_heldout_hidden_sizes_are_in_no_other_set():
    """The learned fallback's held-out score means something only if no other set (fitted on) has them."""
    held = {c for _, c, _ in PS.load("heldout").shapes}
    for name in set(PS.list_sets()) - {"heldout"}:
        assert not held & {c for _, c, _ in PS.load(name).shapes}, name
