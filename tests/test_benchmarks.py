"""The benchmark harness's own logic: FLOP counts, the naive baselines, the timing record,
results.json / results.md / plots, and that a failing case is reported while the rest run."""
import contextlib
import functools
import inspect
import io
import json
import sys
import types

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparse_ops
from benchmarks import baselines, flops, report
from benchmarks.__main__ import main
from benchmarks.core import Case, Config, Setup, Unavailable
from benchmarks.suites import SUITES
from sparse_ops import reference


def unfused(label: str, **overrides) -> torch.nn.Module:
    """A model of MODELS with attention as explicit matmuls, which FlopCounterMode counts on
    CPU (it has no formula for the CPU flash kernel)."""
    name, kwargs = baselines.MODELS[label]
    net = timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return net


def counted(fn, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("label,kwargs,batch", [
    ("vit_test", {}, 3),
    ("deit_small", {}, 1),
    ("swin_test", {}, 2),  # 18x18 tokens: padded windows
    ("swin_tiny", {}, 1),
    ("eva_test", {}, 2),  # Eva: rope, SwiGLU (GluMlp), q/v bias outside the Linear
])
def test_dense_flops_match_flop_counter(label, kwargs, batch):
    net = unfused(label, **kwargs)
    images = torch.randn(batch, 3, *net.patch_embed.img_size)
    expected = counted(net, images)
    count = flops.swin(net, batch) if label.startswith("swin") else flops.vit(net, batch)
    assert count == expected


def test_sparse_swin_flops_match_flop_counter():
    net = unfused("swin_test", img_size=56)  # 14x14 tokens: no padding, so the MLP count is exact
    images = torch.randn(2, 3, 56, 56)
    kept = baselines.swin_kept_windows(net, [0.5, 0.0, 0.25, 0.0, 0.5, 0.5, 0.0, 0.0])
    assert kept[0] < flops.swin_windows(net.layers[0].blocks[0])[0]
    assert counted(baselines.sparsevit_forward, net, images, kept) == flops.swin(net, 2, kept)


def test_sam_flops_by_hand():
    """6x6 tokens: a windowed block (2x2 windows of 4x4, real tokens 16, 8, 8, 4: the last
    row and column padded), then a global one; width 32, 2 heads of 16, MLP 128, neck 8.
    Multiply-adds, doubled at the end."""
    net = timm.create_model("samvit_base_patch16", pretrained=False, img_size=96, embed_dim=32, depth=2, num_heads=2,
                            window_size=4, global_attn_indexes=(1,), neck_chans=8)
    C, hidden, heads, D, N, n = 32, 128, 2, 16, 36, 16
    stem = N * C * 3 * 16 * 16 + N * 8 * C + N * 8 * 8 * 9  # patch embedding, neck's 1x1 and 3x3 convs
    linears, mlp = C * 3 * C + C * C, 2 * C * hidden  # qkv + proj, fc1 + fc2: per token

    def attention(tokens, height, width):  # q k^T, p v and q against the height and width tables
        return heads * (2 * tokens * tokens * D + tokens * D * (height + width))

    def windowed(kept, real_tokens):
        return kept * (n * linears + attention(n, 4, 4)) + real_tokens * mlp

    global_block = N * linears + attention(N, 6, 6) + N * mlp
    assert flops.sam(net, 1) == 2 * (stem + windowed(4, N) + global_block)
    # image 0 keeps windows 0 and 3 (16 + 4 real tokens), image 1 windows 1 and 2 (8 + 8)
    sparse = 2 * (2 * stem + windowed(2, 20) + windowed(2, 16) + 2 * global_block)
    assert flops.sam(net, 2, [[[0, 3], [1, 2]], None]) == sparse
    # the global block query-pruned to windows 0 and 1 of image 0 (16 + 8 real tokens as queries)
    queries = 24
    pruned_global = (queries * C * C + N * 2 * C * C + heads * (2 * queries * N * D + queries * D * (6 + 6))
                     + queries * (C * C + mlp))
    assert flops.sam(net, 1, [None, [[0, 1]]]) == 2 * (stem + windowed(4, N) + pruned_global)


def test_sam_changed_windows_reads_what_ours_ran():
    """The windows a patched SAM's blocks changed, query-pruned global blocks included, are the
    windows its ranking kept: 5 of 9 in every block at ratio 0.5."""
    net = baselines.model("samvit_test", "cpu", torch.float32, None)
    ours = baselines.patched("sam", net, ratios=0.5, query_pruned_global=True)  # (a copy: the model is shared)
    changed = baselines.sam_changed_windows(ours, torch.randn(2, 3, 160, 160))
    assert len(changed) == 4 and all(len(ids) == 5 for block in changed for ids in block)
    sparse_ops.set_sparsity(ours, ratios=[0.5, 0.0, 0.5, 0.0])
    changed = baselines.sam_changed_windows(ours, torch.randn(2, 3, 160, 160))
    assert changed[1] is None and changed[3] is None and len(changed[0][0]) == 5


def test_sam_flops_match_flop_counter():
    """Dense, and the naive baseline pruning half of every windowed block's windows (9 windows,
    padded ones among them: the MLP counts real tokens only)."""
    net = unfused("samvit_test")
    images = torch.randn(2, 3, 160, 160)
    assert counted(net.forward_features, images) == flops.sam(net, 2)
    kept = []
    with torch.no_grad():
        baselines.sam_naive_forward(net, images, 0.5, kept=kept)
    assert [k is None for k in kept] == [False, True, False, True] and all(len(ids) == 5 for ids in kept[0])
    assert counted(baselines.sam_naive_forward, net, images, 0.5) == flops.sam(net, 2, kept)


def test_evit_schedule_compounds_the_keep_rate():
    kept = [5, 3]
    schedule = flops.evit_schedule(9, 4, (1, 2), kept, num_prefix=1)
    assert schedule == [(9, 9), (9, 6), (6, 4), (4, 4)]
    net = unfused("vit_test")
    dense = flops.vit(net, 2)
    N = net.patch_embed.num_patches + 1
    sparse = flops.vit(net, 2, [flops.evit_schedule(N, 4, (1, 2, 3), [8, 4, 2])] * 2)
    assert dense > sparse > 0


# ------------------------------------------------------------------ naive baselines
def test_naive_vit_at_zero_sparsity_equals_dense():
    torch.manual_seed(0)
    net = baselines.model("vit_test", "cpu", torch.float32, None)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = net(images)
        assert torch.equal(baselines.evit_forward(net, images, keep_rate=1.0, layers=(1, 2)), dense)
        # mass 1 keeps every token but runs the adaptive path: pruning blocks, padding, masks
        adaptive = baselines.evit_forward(net, images, mass=1.0, layers=(1, 2))
    torch.testing.assert_close(adaptive, dense, rtol=1e-4, atol=1e-5)


def test_naive_vit_prune_block_keeps_the_dense_rows():
    """With keep rate r the block's output rows are the dense block's rows of the kept tokens
    (the MLP is per token); the count is ceil(r * candidates)."""
    torch.manual_seed(0)
    net = baselines.model("vit_test", "cpu", torch.float32, None)
    block = net.blocks[1]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        dense = block(x)
        out, key_mask, kept = baselines.evit_prune_block(block, x, 1, keep_rate=0.5)
    assert key_mask is None and kept == 8 and out.shape == (2, 9, 32)
    torch.testing.assert_close(out[:, 0], dense[:, 0])
    for b in range(2):
        distance, nearest = torch.cdist(out[b, 1:], dense[b, 1:]).min(dim=1)
        assert distance.max() < 1e-4 and len(set(nearest.tolist())) == 8


def test_naive_vit_padding_matches_one_image_at_a_time():
    """The adaptive mode pads the batch to its largest count: masking must make every image's
    result what it is alone."""
    torch.manual_seed(0)
    net = unfused("vit_test")
    for block in net.blocks:  # sharper attention than at initialisation: the counts differ per image
        block.attn.qkv.weight.data *= 10
    images = torch.randn(4, 3, 32, 32)
    counts = []
    with torch.no_grad():
        batched = baselines.evit_forward(net, images, mass=0.6, layers=(1, 2), counts=counts)
        alone = torch.cat([baselines.evit_forward(net, images[b : b + 1], mass=0.6, layers=(1, 2)) for b in range(4)])
    assert all(len(set(c)) > 1 for c in counts)  # the images do keep different counts
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [0, 1])
def test_naive_swin_block_equals_dense_on_kept_windows(stage):
    """Kept windows get the dense block's output (attention stays inside a window, the MLP is
    per token), pruned windows pass through; all windows kept = the dense block."""
    torch.manual_seed(0)
    net = baselines.model("swin_test", "cpu", torch.float32, None)
    for block in net.layers[stage].blocks:  # unshifted and shifted, padded frames
        H, W = block.input_resolution
        x = torch.randn(2, H, W, block.dim)
        windows = flops.swin_windows(block)[0]
        ws, shift = block.window_size, block.shift_size
        with torch.no_grad():
            dense = block(x)
            torch.testing.assert_close(baselines.sparsevit_block(block, x, windows), dense)
            kept = sparse_ops.select_windows(sparse_ops.window_scores(x, ws, shift), windows // 2)
            expected = reference.scatter_windows(reference.gather_windows(dense, kept, ws, shift), x, kept, ws, shift)
            torch.testing.assert_close(baselines.sparsevit_block(block, x, windows // 2), expected)


def test_naive_swin_backbone_is_timms_at_zero_sparsity_and_prunes_like_ours():
    """sparsevit_features returns forward_intermediates' features; pruned, it ranks once per
    stage and window grid (SparseViT's rule, and ours), so it equals patch.swin."""
    torch.manual_seed(0)
    net = baselines.model("swin_test", "cpu", torch.float32, None)
    images = torch.randn(2, 3, 72, 72)
    blocks = sum(len(stage.blocks) for stage in net.layers)
    with torch.no_grad():
        for stage in net.layers:  # a first block that changes which windows rank highest
            stage.blocks[0].mlp.fc2.weight.normal_()
        dense = net.forward_intermediates(images, intermediates_only=True)
        all_kept = baselines.swin_kept_windows(net, [0.0] * blocks)
        for got, want in zip(baselines.sparsevit_features(net, images, all_kept), dense, strict=True):
            torch.testing.assert_close(got, want)
        # every block pruned; and each stage's first block dense (ranked on the stage's input all the same)
        for ratios in ([0.5] * blocks, [0.0 if b == 0 else 0.5 for stage in net.layers for b in range(len(stage.blocks))]):
            ours = baselines.patched("swin", net, ratios=ratios)
            pruned = baselines.sparsevit_features(net, images, baselines.swin_kept_windows(net, ratios))
            for got, want in zip(pruned, ours.forward_intermediates(images, intermediates_only=True), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(pruned[0], dense[0])  # it does prune


def test_naive_sam_block_equals_timms_on_kept_windows():
    """Kept windows' real tokens get timm's block output (attention stays inside a padded
    window, the MLP is per token), pruned windows pass through; all windows kept = timm's."""
    torch.manual_seed(0)
    net = baselines.model("samvit_test", "cpu", torch.float32, None)
    block = net.blocks[0]
    x = torch.randn(2, 10, 10, 64)  # 3x3 windows of 4x4, the last row and column padded
    with torch.no_grad():
        dense = block(x)
        torch.testing.assert_close(baselines.sam_naive_block(block, x, torch.arange(9).expand(2, 9)), dense)
        windows = torch.tensor([[8, 0, 4], [2, 6, 5]])
        kept = torch.zeros(2, 12, 12, dtype=torch.bool)  # the padded frame
        for b, ids in enumerate(windows.tolist()):
            for w in ids:
                kept[b, 4 * (w // 3):4 * (w // 3) + 4, 4 * (w % 3):4 * (w % 3) + 4] = True
        kept = kept[:, :10, :10, None]
        torch.testing.assert_close(baselines.sam_naive_block(block, x, windows), torch.where(kept, dense, x))


def test_flex_peer_fails_past_its_graph_limit_instead_of_running_unfused(monkeypatch):
    """Past dynamo's recompile limit a compiled flex_attention silently runs eager and
    unfused (Swin-T at 224 needs 11 graphs, dynamo's default limit is 8): the peer raises
    there instead, so that it is never timed crippled."""
    torch._dynamo.reset()
    net = baselines.model("swin_test", "cpu", torch.float32, None)
    kept = baselines.swin_kept_windows(net, [0.5] * 8)  # stages 0 and 1: two graphs each
    monkeypatch.setattr(baselines, "FLEX_RECOMPILE_LIMIT", 1)
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        baselines.sparsevit_forward(net, torch.randn(1, 3, 72, 72), kept, attention=baselines.flex_window_attention)
    torch._dynamo.reset()


def test_a_peer_is_checked_against_ours_before_it_is_timed():
    x = torch.randn(4, 8)
    expected = baselines.expected_of(lambda: x.exp())
    same = baselines.peer(lambda: lambda: x.exp(), expected, "cpu", torch.float32)
    assert callable(same)
    wrong = baselines.peer(lambda: lambda: x.exp() * 1.01, expected, "cpu", torch.float32)
    assert isinstance(wrong, AssertionError) and "disagrees with ours" in str(wrong)
    # mapped to ours' layout first (e.g. the rows of a padded batch)
    padded = torch.cat([x.exp(), torch.zeros(2, 8)])
    assert callable(baselines.peer(lambda: lambda: padded, expected, "cpu", torch.float32, as_ours=lambda t: t[:4]))

    def no_kernel():
        raise NotImplementedError("no CPU kernel\nmore detail")
    missing = baselines.peer(lambda: no_kernel, expected, "cpu", torch.float32)
    assert missing == Unavailable("NotImplementedError: no CPU kernel")
    assert isinstance(baselines.peer(lambda: lambda: x[:2], expected, "cpu", torch.float32), ValueError)
    unchecked = baselines.peer(lambda: lambda: x, baselines.expected_of(Unavailable("not yet")), "cpu", torch.float32)
    assert isinstance(unchecked, RuntimeError)


# --------------------------------------------------------------------- whole runs
SMOKE = "ops/gather_tokens,varlen/vit_test/b2/fwd+bwd,blocks/swin_test,models/vit_test/b2/keep"
PEERS = ("varlen/vit_test/b2/fwd,window/swin_test/b1/stage0/s0.5/fwd+bwd,models/swin_test/b1/s0.5/backbone,"
         "models/samvit_test")


def read_results(out):
    data = json.loads((out / "results.json").read_text())
    return data, {r["name"]: r for r in data["cases"]}, (out / "results.md").read_text()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run of the smoke and peer cases, which several tests inspect: each run pays
    for FlexAttention's CPU compiles, and the attention cases dominate the file's time."""
    out = tmp_path_factory.mktemp("quick_run")
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        status = main(["--quick", "--flex", "--case", f"{SMOKE},{PEERS}", "--out", str(out)])
    return status, out, terminal.getvalue()


def test_quick_run_writes_results_tables_and_plots(quick_run):
    status, out, terminal = quick_run
    assert status == 0
    data, records, markdown = read_results(out)
    assert terminal == markdown  # the terminal shows what results.md holds

    env = data["environment"]
    assert data["schema_version"] == 1
    assert env["device_type"] == "cpu" and env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert env["timm"] == timm.__version__ and env["git_commit"] and "--quick" in env["command"]
    assert env["cpu_threads"] == 1 and ", 1 CPU threads, " in markdown  # the README table's thread count
    assert sorted(records) == sorted([
        "ops/gather_tokens/2x17x16/s0.5", "attention/varlen/vit_test/b2/fwd+bwd",
        "blocks/swin_test/b1/stage0/s0.0", "blocks/swin_test/b1/stage0/s0.5",
        "models/vit_test/b2/keep1.0", "models/vit_test/b2/keep0.5",
        # PEERS ("varlen/vit_test/b2/fwd" is a part of both varlen names)
        "attention/varlen/vit_test/b2/fwd", "attention/window/swin_test/b1/stage0/s0.5/fwd+bwd",
        "models/swin_test/b1/s0.5/backbone", "models/samvit_test/b1/r0.5", "models/samvit_test/b1/r0.5/qglobal"])
    for name, r in records.items():
        assert r["error"] is None, r["error"]
        assert r["methods"][r["baseline"]]["speedup"] == 1.0
        for method, m in r["methods"].items():
            assert m["status"] in ("ok", "unavailable"), (name, method, m)
            if m["status"] == "ok":
                assert 0 < m["min_s"] <= m["q25_s"] <= m["median_s"] <= m["q75_s"] <= m["max_s"]
                assert m["rounds"] == 3 and m["peak_mem_bytes"] is None  # CPU: no peak memory
        assert f"| {name.split('/', 1)[1]} |" in markdown

    ops = records["ops/gather_tokens/2x17x16/s0.5"]
    assert ops["bytes"] > 0 and ops["ideal_speedup"] is None
    assert ops["methods"]["copy"]["pct_of_copy"] == 100.0 and ops["methods"]["ours"]["gbps"] > 0
    model = records["models/vit_test/b2/keep0.5"]
    assert model["ideal_speedup"] == pytest.approx(model["flops"]["dense"] / model["flops"]["sparse"])
    assert model["ideal_speedup"] > 1 and 0 < model["sparsity"] < 1
    naive = model["methods"]["naive"]
    assert naive["efficiency"] == pytest.approx(naive["speedup"] / model["ideal_speedup"])
    assert model["methods"]["ours"]["status"] == "ok"  # sparse_ops.patch.vit

    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["speedup_blocks_swin_test_b1_stage0.png", "speedup_models_vit_test_b2.png"]
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown


def test_ours_lights_up_when_the_ops_land(quick_run, tmp_path, monkeypatch):
    """The 'ours' columns call sparse_ops.varlen_attention, and sparse_ops.patch as soon as
    it exists (stood in for here by an identity patch)."""
    _, records, _ = read_results(quick_run[1])
    varlen = records["attention/varlen/vit_test/b2/fwd"]
    assert varlen["methods"]["ours"]["status"] == varlen["methods"]["ours+cls"]["status"] == "ok"
    assert varlen["overheads"]["cls_attn"] is not None

    patch = types.ModuleType("sparse_ops.patch")
    patch.vit = lambda net, keep_rate=1.0, mass=None, prune_layers=None, package=False: net
    monkeypatch.setitem(sys.modules, "sparse_ops.patch", patch)
    main(["--quick", "--case", "models/vit_test/b2/keep0.5", "--out", str(tmp_path)])
    _, records, _ = read_results(tmp_path)
    assert records["models/vit_test/b2/keep0.5"]["methods"]["ours"]["status"] == "ok"


def test_a_model_kind_patch_lacks_is_unavailable(monkeypatch):
    """A case whose patch.<kind> has not landed still times its other methods."""
    monkeypatch.setattr(sparse_ops, "patch", types.ModuleType("sparse_ops.patch"))
    assert baselines.patched("sam", torch.nn.Identity()) == Unavailable("sparse_ops.patch.sam is not in this checkout yet")


def test_a_failing_case_is_reported_and_the_rest_run(tmp_path, monkeypatch):
    def broken_build():
        raise RuntimeError("cannot build")

    def broken_method():
        raise ValueError("bad method")

    x = torch.randn(64)
    working = Setup({"dense": x.clone, "naive": broken_method, "ours": Unavailable("not yet"),
                     "ours+cls": KeyError("failed to build")})
    suite = types.ModuleType("fake", "fake: a suite of test cases.")
    suite.NAME, suite.MEMORY_BOUND, suite.X_LABEL = "fake", False, "x"
    suite.cases = lambda cfg: [Case("fake", "fake/broken", "g", {}, broken_build),
                               Case("fake", "fake/working", "g", {}, lambda: working)]
    monkeypatch.setitem(SUITES, "fake", suite)
    assert main(["--quick", "--suite", "fake", "--out", str(tmp_path)]) == 0
    _, records, markdown = read_results(tmp_path)
    assert records["fake/broken"]["error"]["error"] == "RuntimeError: cannot build"
    methods = records["fake/working"]["methods"]
    assert methods["dense"]["status"] == "ok"
    assert methods["naive"] == {**methods["naive"], "status": "error", "error": "ValueError: bad method"}
    assert methods["ours"] == {"status": "unavailable", "reason": "not yet"}
    assert methods["ours+cls"]["error"] == "KeyError: 'failed to build'"
    assert "error: RuntimeError: cannot build" in markdown and "error: ValueError: bad method" in markdown


@pytest.mark.parametrize("device, quick", [("cpu", True), ("cpu", False), ("cuda", False)])
def test_every_case_builds_with_the_parameters_it_reports(device, quick):
    """A case's build holds its own arguments, bound when it is listed: a lambda over the loop's
    variables built with their last values (the varlen and DeiT-block cases ran at the Swin
    cases' batch). Checked on every argument the case reports under the same name."""
    cfg = Config(device, torch.float32, quick, False)
    for suite in SUITES.values():
        for case in suite.cases(cfg):
            assert isinstance(case.build, functools.partial), case.name
            bound = inspect.signature(case.build.func).bind(*case.build.args, **case.build.keywords).arguments
            shared = bound.keys() & case.params.keys()
            assert shared, case.name
            for name in shared:
                assert bound[name] == case.params[name], (case.name, name)


def test_help_lists_suites_and_cases(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in SUITES:
        assert f"\n  {name}: " in text
    assert "models/" not in text and "deit_small" in text and "--case" in text
    main(["--quick", "--list", "--suite", "models", "--case", "swin"])
    assert capsys.readouterr().out.split() == ["models/swin_test/b1/s0.0", "models/swin_test/b1/s0.5",
                                               "models/swin_test/b1/s0.5/backbone"]
    main(["--list", "--device", "cuda", "--suite", "models", "--case", "swin_tiny_672"])  # no GPU needed
    names = capsys.readouterr().out.split()
    assert "models/swin_tiny_672/b4/sparsevit" in names and "models/swin_tiny_672/b4/sparsevit/backbone" in names


def test_peers_run_beside_ours_and_agree(quick_run):
    """The quick cases time every peer torch has here, each checked against ours first
    ("ok" means it agreed), and list the others unavailable with torch's reason."""
    status, out, _ = quick_run
    assert status == 0
    _, records, markdown = read_results(out)
    varlen = records["attention/varlen/vit_test/b2/fwd"]
    for name in ("dense", "naive", "flex", "ours", "ours+cls"):
        assert varlen["methods"][name]["status"] == "ok", (name, varlen["methods"][name])
    from torch.nn.attention import varlen as torch_varlen  # noqa: F401 (torch 2.14 has it; its kernel is CUDA only)
    assert varlen["methods"]["varlen_attn"]["status"] == "unavailable"
    assert "CPU" in varlen["methods"]["varlen_attn"]["reason"]
    assert set(varlen["overheads"]) == {"cls_attn", "ours/naive", "ours/flex"}
    assert all(v is not None for v in varlen["overheads"].values())

    window = records["attention/window/swin_test/b1/stage0/s0.5/fwd+bwd"]  # gradients checked too
    assert window["methods"]["dense"]["status"] == window["methods"]["naive"]["status"] == "ok"
    assert window["methods"]["flex"] == {"status": "unavailable", "reason": window["methods"]["flex"]["reason"]}
    assert "backward on CPU" in window["methods"]["flex"]["reason"]

    backbone = records["models/swin_test/b1/s0.5/backbone"]
    assert {name: m["status"] for name, m in backbone["methods"].items()} == \
        {"dense": "ok", "naive": "ok", "flex": "ok", "ours": "ok"}
    assert 0 < backbone["sparsity"] < 1 and set(backbone["overheads"]) == {"ours/naive", "ours/flex"}
    assert "| ours/flex overhead |" in markdown

    sam = records["models/samvit_test/b1/r0.5"]  # patch.sam, and the SparseViT-style peer agreeing with it
    assert {name: m["status"] for name, m in sam["methods"].items()} == {"dense": "ok", "naive": "ok", "ours": "ok"}
    assert 1 < sam["ideal_speedup"] and 0 < sam["sparsity"] < 1 and set(sam["overheads"]) == {"ours/naive"}


# ------------------------------------------------------------ noise: flags and plots
def timed(median, q25=None, q75=None, speedup=None, efficiency=None) -> dict:
    """A method's record as run.py writes it (only what the report reads)."""
    return {"status": "ok", "median_s": median, "q25_s": median if q25 is None else q25,
            "q75_s": median if q75 is None else q75, "speedup": speedup, "efficiency": efficiency}


def case_record(**methods) -> dict:
    return {"name": "models/x/b1/keep0.5", "baseline": "dense", "error": None, "methods": methods}


def test_rows_with_a_wide_spread_or_above_their_ideal_are_unreliable():
    quiet = timed(1.0, 0.95, 1.05)  # ±5 %
    record = case_record(dense=quiet, naive=timed(0.5, 0.46, 0.54, 2.0, 0.9),  # ±8 %
                         ours=timed(0.4, 0.39, 0.41, 2.5, 1.1), slow=timed(1.0, 0.7, 1.3, 1.0, 0.5),
                         copy={"status": "unavailable", "reason": "-"})
    assert report.spread(record["methods"]["slow"]) == pytest.approx(0.3)
    assert report.unreliable(record, "dense") == [] and report.unreliable(record, "naive") == []
    assert report.unreliable(record, "ours") == ["efficiency 110% > 100 %"]
    assert report.unreliable(record, "slow") == ["spread ±30.0 %"]
    assert report.unreliable(record, "copy") == []
    # a noisy baseline makes every speedup over it unreliable
    record["methods"]["dense"] = timed(1.0, 0.8, 1.2)
    assert report.unreliable(record, "dense") == ["spread ±20.0 %"]
    assert report.unreliable(record, "naive") == ["dense's spread ±20.0 %"]


def test_unreliable_rows_are_marked_in_the_table_and_listed_with_advice():
    record = case_record(dense=timed(1.0, 0.95, 1.05, 1.0), ours=timed(0.4, 0.2, 0.6, 2.5, 1.25))
    record.update(ideal_speedup=2.0, overheads={})
    for m in record["methods"].values():
        m.update(min_s=m["q25_s"], max_s=m["q75_s"], gbps=None, pct_of_copy=None, peak_mem_bytes=None)
    suite = types.SimpleNamespace(MEMORY_BOUND=False)
    rows = report.case_rows(record, report.columns(suite, "cpu")).splitlines()
    assert rows[0].endswith("|  |") and "⚠ spread ±50.0 %; ⚠ efficiency 125% > 100 %" in rows[1]
    section = report.unreliable_section([record, {**record, "error": {"error": "x"}}])
    assert "1 rows are marked ⚠" in section and "--rounds" in section and "quiet machine" in section
    assert "- models/x/b1/keep0.5 ours: spread ±50.0 %; efficiency 125% > 100 %" in section
    record["methods"]["ours"] = timed(0.5, 0.49, 0.51, 2.0, 1.0)
    assert report.unreliable_section([record]) == ""


def test_plot_axis_is_clipped_only_above_twice_the_ideal():
    assert report.axis_limit([1.2, 1.9, 2.3], [1.3, 2.5]) is None
    assert report.axis_limit([1.2, 1.9, 311.24], [1.3, 2.5]) == 5.0  # a noisy round's 311x
    assert report.axis_limit([1.0, 1.1, 1.3, 9.0], []) == pytest.approx(3 * 1.3)  # no ideal: the median's 3x
    assert report.axis_limit([], [2.0]) is None
    record = case_record(dense=timed(1.0), ours=timed(0.5, 0.4, 0.625, 2.0))
    assert report.speedup_band(record, "ours") == (1.6, 2.0, 2.5)


def test_plot_with_an_outlier_writes_error_bars_and_says_it_clipped(tmp_path, monkeypatch):
    records = []
    for sparsity, ours in ((0.0, timed(1.0, 0.9, 1.1, 1.0)), (0.5, timed(0.01, 0.005, 0.02, 100.0))):
        records.append({**case_record(dense=timed(1.0, speedup=1.0), ours=ours), "suite": "models", "group": "g",
                        "sparsity": sparsity, "ideal_speedup": 1 + sparsity})
    titles, errorbars = [], []
    original = report.plt.Axes.errorbar
    monkeypatch.setattr(report.plt.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    monkeypatch.setattr(report.plt.Axes, "errorbar",
                        lambda self, *a, **kw: errorbars.append((a, kw)) or original(self, *a, **kw))
    names = report.plot(records, {"models": types.SimpleNamespace(X_LABEL="x")}, tmp_path,
                        {"device": "cpu", "dtype": "float32"})
    assert names == ["speedup_models_g.png"] and (tmp_path / names[0]).exists()
    assert "error bars: IQR" in titles[0] and "axis clipped at 3.00×" in titles[0]
    (x, shown), kw = errorbars[0]
    assert list(shown) == [1.0, 3.0]  # the outlier sits at the edge
    assert kw["yerr"][0][0] == pytest.approx(1.0 - 1 / 1.1) and kw["yerr"][1][0] == pytest.approx(1 / 0.9 - 1.0)


def test_threads_and_rounds_options(tmp_path, monkeypatch):
    from benchmarks import __main__ as harness
    from benchmarks.timing import budget
    assert budget("cpu", False, 12).min_rounds == 12 and budget("cpu", False).min_rounds == 5
    assert budget("cpu", True, 7).max_rounds == 7
    seen = {}
    monkeypatch.setattr(harness, "_run", lambda cases, cfg, argv, out: seen.update(
        threads=torch.get_num_threads(), rounds=cfg.rounds, flex=cfg.flex) or 0)
    before = torch.get_num_threads()
    main(["--quick", "--case", "ops/gather_tokens", "--out", str(tmp_path)])
    assert seen == {"threads": harness.CPU_THREADS, "rounds": None, "flex": False}  # --quick: no flex compiles
    assert torch.get_num_threads() == before
    main(["--quick", "--case", "ops/gather_tokens", "--threads", "2", "--rounds", "4", "--flex", "--out", str(tmp_path)])
    assert seen == {"threads": 2, "rounds": 4, "flex": True}
    main(["--case", "ops/gather_tokens", "--out", str(tmp_path)])
    assert seen["flex"] is True
    with pytest.raises(SystemExit):
        main(["--quick", "--threads", "0"])


def test_quick_leaves_out_the_flex_peers():
    """--quick's default: FlexAttention's CPU compiles were most of a quick run's time."""
    from benchmarks.core import NO_FLEX
    cfg = Config("cpu", torch.float32, True, False, flex=False)
    cases = [c for suite in SUITES.values() for c in suite.cases(cfg)
             if c.name in ("attention/varlen/vit_test/b2/fwd", "models/swin_test/b1/s0.5")]
    assert len(cases) == 2
    for case in cases:
        assert case.build().methods["flex"] is NO_FLEX, case.name


def test_training_suite_times_the_dense_sparse_step_against_dense_plus_pruned(tmp_path):
    """Issue 33's training cost: the quick cases run every method and report ours over
    dense+pruned, the reference a dense/sparse step must stay within."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--quick", "--suite", "training", "--out", str(tmp_path)]) == 0
    _, records, markdown = read_results(tmp_path)
    assert sorted(records) == ["training/swin_test/b1/s0.5", "training/vit_test/b2/keep0.5"]
    for name, r in records.items():
        assert r["error"] is None and 0 < r["sparsity"] < 1, name
        assert {m: v["status"] for m, v in r["methods"].items()} == dict.fromkeys(("dense", "ours", "dense+pruned"), "ok")
        assert r["overheads"]["ours/dense+pruned"] is not None
    assert markdown.count("| ours/dense+pruned overhead |") == 2  # a row per case
