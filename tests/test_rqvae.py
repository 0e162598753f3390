"""rqvae/: fit / encode / save / load, quality on clustered data, merging, dedup, bad input, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import load_semantic_ids, save_semantic_ids
from dataset.mm_emb import MMEmbedding
from rqvae import RQVAE, RQVAEConfig, encode, fit, generate_semantic_ids, generate_semantic_ids_on_demand, merge_features
from rqvae.dedup import dedup_codes
from rqvae.stats import collision_stats, level_stats

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(num_epochs=3, codebook_size=32, hidden_dims=(32,), latent_dim=8, kmeans_iters=8)


def clustered(n: int, d: int, k: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d)) * 3
    return (c[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_defaults_are_the_documented_ones():
    c = RQVAEConfig()
    assert (c.num_quantizers, c.codebook_size, c.commitment_cost, c.lr, c.num_epochs, c.batch_size, c.device) == \
        (4, 256, 0.25, 1e-3, 20, 1024, "auto")


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_fit_encode_shapes_range_and_usage(method):
    x = clustered(4000, 16)
    model, report = fit(x, RQVAEConfig(method=method, **FAST))
    codes = encode(model, x)
    assert codes.shape == (4000, 4) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 32
    for lvl in range(4):  # no codebook collapse: (nearly) every code in use at every level
        assert len(np.unique(codes[:, lvl])) >= 30
    assert collision_stats(codes)["collision_rate"] < 0.3
    assert report["recon_mse"] < 1.0


def test_deterministic_on_cpu():
    x = clustered(1500, 8)
    cfg = RQVAEConfig(seed=5, **FAST)
    a = encode(fit(x, cfg)[0], x)
    b = encode(fit(x, cfg)[0], x)
    np.testing.assert_array_equal(a, b)


def test_fit_runs_where_torch_has_no_fused_adam(monkeypatch):
    """torch before 2.4 has no fused Adam on the CPU (the constructor raises): fit falls back to the plain one."""
    plain = torch.optim.Adam
    made = []

    def adam(params, lr, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        made.append(lr)
        return plain(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    x = clustered(1500, 8)
    model, report = fit(x, RQVAEConfig(**FAST))
    assert made == [FAST.get("lr", 1e-3)] and report["epochs"] == FAST["num_epochs"]


def test_save_load_roundtrip_gives_identical_codes(tmp_path):
    x = clustered(1000, 12)
    model, _ = fit(x, RQVAEConfig(**FAST))
    model.save(tmp_path)
    meta = json.loads((tmp_path / "rqvae_config.json").read_text())
    assert meta["in_dim"] == 12 and len(meta["normalisation"]["mean"]) == 12
    torch.load(tmp_path / "rqvae_model.pt", weights_only=True)  # loads without running code
    np.testing.assert_array_equal(encode(RQVAE.load(tmp_path), x), encode(model, x))


def test_fewer_items_than_codes_and_a_single_item(caplog):
    x = clustered(10, 6)
    with caplog.at_level("INFO"):
        model, _ = fit(x, RQVAEConfig(**FAST))
    assert "codebook" in caplog.text
    assert encode(model, x).shape == (10, 4)
    one = x[:1]
    assert encode(fit(one, RQVAEConfig(**FAST))[0], one).shape == (1, 4)


def test_standardisation_keeps_losses_balanced():
    """Huge or tiny input scale must not change the result: we standardise before anything else."""
    x = clustered(1500, 8)
    cfg = RQVAEConfig(**FAST)
    base = encode(fit(x, cfg)[0], x)
    big = encode(fit(x * 1e4, cfg)[0], x * 1e4)
    assert (base == big).mean() > 0.95


def test_merge_same_dims_is_the_mean_and_different_dims_concatenate():
    a = MMEmbedding("81", np.array([1, 2]), np.array([[2.0, 0.0], [0.0, 4.0]], np.float32))
    b = MMEmbedding("82", np.array([2, 3]), np.array([[0.0, 2.0], [6.0, 0.0]], np.float32))
    ids, x = merge_features({"81": a, "82": b})
    assert ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(x, [[2, 0], [0, 3], [6, 0]])
    c = MMEmbedding("83", np.array([3]), np.array([[3.0, 4.0, 0.0]], np.float32))
    ids, x = merge_features({"81": a, "83": c})
    assert ids.tolist() == [1, 2, 3] and x.shape == (3, 5)
    np.testing.assert_allclose(x[0], [1, 0, 0, 0, 0])  # L2-normalised block, zeros where the feature is missing
    np.testing.assert_allclose(x[2], [0, 0, 0.6, 0.8, 0])


def test_dedup_resolves_collisions_within_prefix():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (300, 4))
    resid = rng.normal(size=(300, 4)).astype(np.float32)
    cb = rng.normal(size=(256, 4)).astype(np.float32)
    assert collision_stats(codes)["collision_rate"] > 0.9
    new, info = dedup_codes(codes, resid, cb)
    assert collision_stats(new)["collision_rate"] == 0.0 and info["unresolved"] == 0
    np.testing.assert_array_equal(new[:, :3], codes[:, :3])  # only the last level moves


def test_dedup_reports_what_cannot_be_resolved():
    codes = np.zeros((5, 4), np.int64)
    new, info = dedup_codes(codes, np.zeros((5, 2), np.float32), np.zeros((2, 2), np.float32))
    assert info == {"moved": 1, "unresolved": 3} and collision_stats(new)["unique_ids"] == 2


def _emb_dir(root: Path, rows: dict[int, list[float]], fid: str = "81", extra: list[str] = ()) -> Path:
    dim = len(next(iter(rows.values())))
    d = root / "creative_emb" / f"emb_{fid}_{dim}"
    d.mkdir(parents=True)
    lines = [json.dumps({"anonymous_cid": c, "emb": v}) for c, v in rows.items()] + list(extra)
    (d / "part-00000").write_text("\n".join(lines) + "\n")
    return root


def test_bad_rows_skipped_and_counted_in_the_report(tmp_path):
    x = clustered(300, 8)
    rows = {i + 1: x[i].tolist() for i in range(300)}
    rows[1000] = [0.0] * 8  # all zero: no information, no ID
    _emb_dir(tmp_path, rows, extra=['{"anonymous_cid": 2000, "emb": [NaN, 1, 1, 1, 1, 1, 1, 1]}',
                                    '{"anonymous_cid": 2001, "emb": [1, 2]}'])
    sids = generate_semantic_ids_on_demand(tmp_path, ["81"], RQVAEConfig(**FAST))
    assert len(sids) == 300 and 1000 not in sids and 2000 not in sids
    rep = json.loads((tmp_path / "semantic_id_report.json").read_text())
    assert rep["skipped_bad_rows"] == 1
    assert rep["features"]["81"]["skipped"] == {"non_finite": 1, "wrong_length": 1}


def test_mismatched_dims_between_part_files(tmp_path):
    x = clustered(100, 8)
    _emb_dir(tmp_path, {i + 1: x[i].tolist() for i in range(100)})
    (tmp_path / "creative_emb" / "emb_81_8" / "part-00001").write_text(
        "".join(json.dumps({"anonymous_cid": 500 + i, "emb": [1.0] * 16}) + "\n" for i in range(20)))
    sids = generate_semantic_ids_on_demand(tmp_path, ["81"], RQVAEConfig(**FAST))
    assert len(sids) == 100
    rep = json.loads((tmp_path / "semantic_id_report.json").read_text())
    assert rep["features"]["81"]["skipped"] == {"wrong_length": 20}


def test_no_feature_returns_empty_with_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert generate_semantic_ids_on_demand(tmp_path, ["81"], RQVAEConfig(**FAST)) == {}
    assert "no semantic IDs generated" in caplog.text
    assert not (tmp_path / "semantic_id_dict.json").exists()


def test_unwritable_output_fails_before_training(tmp_path, monkeypatch):
    import rqvae.generate as gen

    x = clustered(100, 8)
    _emb_dir(tmp_path, {i + 1: x[i].tolist() for i in range(100)})
    monkeypatch.setattr(gen, "is_writable_dir", lambda p: False)
    monkeypatch.setattr(gen, "fit", lambda *a, **k: pytest.fail("trained although the output is not writable"))
    with pytest.raises(PermissionError, match="not writable"):
        generate_semantic_ids_on_demand(tmp_path, ["81"], RQVAEConfig(**FAST))


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "semantic_id_dict.json"
    save_semantic_ids(p, {1: [1, 2, 3, 4]})
    before = p.read_bytes()

    class Boom(dict):
        def __getitem__(self, k):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        save_semantic_ids(p, Boom({5: [1, 1, 1, 1]}))
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["semantic_id_dict.json"]  # no temp file left behind


@pytest.mark.slow
def test_train_rqvae_cli_writes_everything_and_logs_the_sequence(world):
    train, _ = world
    out = train.parent / "rq_out"
    r = subprocess.run([sys.executable, str(ROOT / "train_rqvae.py"), "--data_dir", str(train), "--output_dir", str(out),
                        "--mm_emb_id", "81", "82", "--num_epochs", "5", "--codebook_size", "64", "--dedup"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("semantic_id_dict.json", "rqvae_model.pt", "rqvae_config.json", "semantic_id_report.json"):
        assert (out / name).is_file()
    log = r.stderr
    for line in ("got ", "items' multimodal features, dim 80", "Epoch 5/5: Loss=", "generated semantic_id for",
                 "saved semantic_id to"):
        assert line in log
    sids, invalid = load_semantic_ids(out / "semantic_id_dict.json", codebook_size=64)
    assert invalid == 0 and len(sids) > 250
    text = (out / "semantic_id_dict.json").read_text()
    assert ": " not in text and "\n" not in text  # compact
    rep = json.loads((out / "semantic_id_report.json").read_text())
    assert {"items", "coverage", "collision_rate", "largest_group", "levels", "seconds"} <= set(rep)
    assert rep["fit"]["recon_mse"] >= 0 and "host_peak_rss_mb" in rep["memory"]


def _many_clusters(n: int, d: int, k: int = 200, seed: int = 0) -> np.ndarray:
    """Uneven clusters plus isotropic noise in many dimensions: after the first level the residual is mostly
    noise, where plain residual k-means degenerates (one centroid ends up nearest to almost everything)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)).astype(np.float32)
    sizes = rng.pareto(1.5, k) + 1
    return c[rng.choice(k, n, p=sizes / sizes.sum())] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("extra", [{}, {"balanced": False}])
def test_rqkmeans_does_not_collapse_in_high_dimensions(extra):
    x = _many_clusters(4000, 512)
    model, _ = fit(x, RQVAEConfig(method="rqkmeans", codebook_size=32, kmeans_iters=8, pca_dim=16, **extra))
    assert model.quantizer.codebooks.shape[-1] == 16  # k-means runs in the projected space
    perplexity = [lv["perplexity"] for lv in level_stats(encode(model, x), 32)]
    assert min(perplexity) >= 0.6 * 32, perplexity


def test_balanced_assignment_balances_codes_on_new_items_too():
    """Heavy-tailed data: plain k-means spends its codes on the far outliers and puts nearly everything else in
    one code; balanced assignment spreads the items, on new ones too (the biases are kept with the codebook), for
    every seed (a k-means++ start, which seeds the outliers, failed on some: hence --kmeans_init auto)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6000, 8))
    x = (g / np.linalg.norm(g, axis=1, keepdims=True) * (rng.pareto(1.0, (6000, 1)) + 0.1)).astype(np.float32)
    perplexity = {}
    for balanced, seed in [(True, 0), (True, 1), (True, 2), (True, 3), (False, 0)]:
        model, _ = fit(x[:4000], RQVAEConfig(method="rqkmeans", codebook_size=32, kmeans_iters=8, balanced=balanced,
                                             seed=seed))
        perplexity[balanced, seed] = [min(lv["perplexity"] for lv in level_stats(encode(model, part), 32))
                                      for part in (x[:4000], x[4000:])]  # fitted items, then new ones
    assert min(min(v) for (b, _), v in perplexity.items() if b) >= 0.5 * 32, perplexity
    assert max(perplexity[False, 0]) < 0.2 * 32, perplexity


def test_balanced_bias_matches_the_log_domain_sinkhorn():
    """The exp-domain Sinkhorn (with absorption) gives the log-domain one's biases: on Gaussian data and on a heavy
    tail, where some centroids are out of every point's reach and their potentials drift far."""
    from rqvae.kmeans import _sq_dist, balanced_bias, nearest

    def log_domain(x, c, iters):
        d = _sq_dist(x, c)
        d = d - d.min(1, keepdim=True).values
        eps = max(float(d.median()) * 0.05, 1e-12)
        logits, g = -d / eps, torch.zeros(len(c))
        for _ in range(iters):
            rows = torch.logsumexp(logits + g, dim=1, keepdim=True)
            g = g - (torch.logsumexp(logits + g - rows, dim=0) - math.log(len(x) / len(c)))
        return (g - g.mean()) * eps

    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(4000, 16, generator=gen)
    heavy = gauss * torch.rand(4000, 1, generator=gen).pow(-1.5)
    for x in (gauss, heavy):
        c = x[torch.randperm(len(x), generator=gen)[:64]].clone()
        ref, got = log_domain(x, c, 50), balanced_bias(x, c, iters=50)
        assert float((ref - got).abs().max()) <= 1e-4 * float(ref.max() - ref.min())
        assert torch.equal(nearest(x, c, bias=ref)[0], nearest(x, c, bias=got)[0])


def test_kmeans_plus_plus_seeds_every_cluster():
    from rqvae.kmeans import kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, 8)) * 50
    sizes = np.r_[5000, np.full(15, 20)]  # one huge cluster, fifteen small far ones
    x = torch.as_tensor(np.concatenate([c + rng.standard_normal((s, 8)) for c, s in zip(centres, sizes)]),
                        dtype=torch.float32)
    found = {}
    for init in ("kmeans++", "random"):
        c, _ = kmeans(x, 16, iters=0, generator=torch.Generator().manual_seed(0), init=init)
        found[init] = len(np.unique(((c[:, None, :].numpy() - centres[None]) ** 2).sum(-1).argmin(1)))
    assert found["kmeans++"] >= 14 and found["random"] <= 8, found


@pytest.mark.parametrize("extra", [{}, {"balanced": False}, {"pca_dim": 0}])
def test_rqkmeans_save_load_roundtrip(tmp_path, extra):
    x = _many_clusters(2000, 48)
    model, _ = fit(x, RQVAEConfig(**{"method": "rqkmeans", "codebook_size": 32, "kmeans_iters": 5, "pca_dim": 8, **extra}))
    model.save(tmp_path)
    np.testing.assert_array_equal(encode(RQVAE.load(tmp_path), x), encode(model, x))


def test_an_rqvae_saved_before_balanced_assignment_still_loads(tmp_path):
    x = clustered(500, 8)
    model, _ = fit(x, RQVAEConfig(**FAST))
    model.save(tmp_path)
    state = torch.load(tmp_path / "rqvae_model.pt", weights_only=True)
    del state["quantizer.bias"]
    torch.save(state, tmp_path / "rqvae_model.pt")
    np.testing.assert_array_equal(encode(RQVAE.load(tmp_path), x), encode(model, x))


def test_an_rqkmeans_saved_before_pca_loads_as_it_was_made(tmp_path):
    """A config written before pca_dim / kmeans_init / balanced existed is rebuilt with the first version's
    behaviour (no PCA), not today's defaults, so its weights fit and it encodes as it did."""
    x = _many_clusters(1000, 96)  # wider than the default pca_dim
    model, _ = fit(x, RQVAEConfig(method="rqkmeans", codebook_size=16, kmeans_iters=4, pca_dim=0, balanced=False,
                                  kmeans_init="random"))
    model.save(tmp_path)
    meta = json.loads((tmp_path / "rqvae_config.json").read_text())
    for key in ("pca_dim", "kmeans_init", "balanced"):
        del meta["config"][key]
    (tmp_path / "rqvae_config.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(encode(RQVAE.load(tmp_path), x), encode(model, x))


def test_boolean_flags_turn_both_ways():
    from genrec.core.cli import FlagParser, add_dataclass_arguments, from_namespace

    p = FlagParser()
    add_dataclass_arguments(p, RQVAEConfig)
    cfg = lambda argv: from_namespace(RQVAEConfig, p.parse_args(argv))  # noqa: E731
    assert cfg([]).balanced is True
    assert cfg(["--no-balanced"]).balanced is False
    assert cfg(["--balanced", "off"]).balanced is False
    assert cfg(["--dedup"]).dedup is True
    assert cfg(["--epochs", "3"]).num_epochs == 3  # train.py's name is accepted
    assert cfg(["--hidden-dims", "64", "32"]).hidden_dims == (64, 32)


def test_dedup_ranks_codes_like_the_plain_distance_in_chunks():
    from rqvae.dedup import _rank_codes

    rng = np.random.default_rng(0)
    resid, cb = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    rows = np.arange(0, 300, 2)
    own_code = rng.integers(0, 16, len(rows))
    own, ranked = _rank_codes(resid, rows, own_code, cb, chunk=7)  # chunk edges inside the data
    plain = ((resid[rows, None, :].astype(np.float64) - cb[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(own, plain[np.arange(len(rows)), own_code], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ranked, np.argsort(plain, axis=1, kind="stable"))


def test_fit_oom_halves_the_batch_then_falls_back_to_cpu(monkeypatch, caplog):
    """The OOM raised inside the training step itself; fit retries with half the batch, and below 64 on the CPU."""
    from rqvae.model import RQVAE as Model

    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    real, calls = Model.forward, {"oom": 0}

    def forward(self, xb):
        if len(xb) > 128:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, xb)

    monkeypatch.setattr(Model, "forward", forward)
    with caplog.at_level("WARNING"):
        model, rep = fit(x, RQVAEConfig(**{**FAST, "batch_size": 512}))
    assert rep["batch_size"] == 128 and calls["oom"] == 2  # 512 -> 256 -> 128
    calls["oom"] = 0

    def forward_oom_4_times(self, xb):  # 512, 256, 128, 64: then the CPU, at the configured batch again
        calls["oom"] += 1
        if calls["oom"] <= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, xb)

    monkeypatch.setattr(Model, "forward", forward_oom_4_times)
    with caplog.at_level("WARNING"):
        model, rep = fit(x, RQVAEConfig(**{**FAST, "batch_size": 512}))
    assert rep["device"] == "cpu" and rep["batch_size"] == 512  # 512..64 failed: the CPU, at the batch asked


def test_standardisation_in_pieces_is_the_plain_formula(monkeypatch):
    """fit's normalisation works in small pieces (cache-sized float64 variance pieces, one reused float32 batch):
    mean and scale are the plain float64 statistics, the output exactly (x - mean) / scale in float32."""
    from rqvae.model import RQVAE

    fit_mod = sys.modules["rqvae.fit"]  # the package's `fit` is the function
    monkeypatch.setattr(fit_mod, "_CHUNK", 700)
    monkeypatch.setattr(fit_mod, "_STAT_BYTES", 8 * 16 * 33)  # 33 rows of 16 float64s a piece
    x = clustered(2500, 16).astype(np.float64) * 3 + 1
    model = RQVAE(16, RQVAEConfig(**FAST))
    out = fit_mod._standardised(model, x, torch.device("cpu"))
    mean = x.mean(0)
    assert np.allclose(model.mean.numpy(), mean, rtol=0, atol=1e-6)
    assert abs(float(model.scale) - np.sqrt(((x - mean) ** 2).mean())) < 1e-6
    want = (torch.from_numpy(x.astype(np.float32)) - model.mean) / model.scale
    assert torch.equal(out, want)


def test_encode_is_the_model_applied_row_by_row_for_any_batch_input_and_dtype(tmp_path):
    """encode standardises in place in one reused host buffer: the codes are exactly the model's own path
    (standardise -> encoder -> quantizer), for any batch size (a short last batch included), float64 input and a
    memory-mapped matrix."""
    x = clustered(2500, 16)
    model, _ = fit(x, RQVAEConfig(**FAST))
    with torch.no_grad():
        ref = model.quantizer.encode(model.encoder(model.standardise(torch.from_numpy(x))).float())[0].numpy()
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    for inp, bs in [(x, 1000), (x, 7), (x.astype(np.float64), 999), (mm, 2048), (x, None)]:
        np.testing.assert_array_equal(encode(model, inp, batch_size=bs), ref)


def test_encode_oom_halves_the_batch_and_gives_the_same_codes(monkeypatch, caplog):
    from rqvae.quantizer import ResidualQuantizer

    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    model, _ = fit(x, RQVAEConfig(**FAST))
    want = encode(model, x, batch_size=100)
    real = ResidualQuantizer.encode

    def enc(self, z):
        if len(z) > 1000:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, z)

    monkeypatch.setattr(ResidualQuantizer, "encode", enc)
    with caplog.at_level("WARNING"):
        got = encode(model, x, batch_size=4096)
    np.testing.assert_array_equal(got, want)  # 4096 -> 2048 -> 1024 -> 512: the same codes






def test_training_assigns_codes_in_fp32_under_autocast():
    """Training-time assignment under bf16 autocast picks the codes encode (fp32) picks."""
    from rqvae.quantizer import ResidualQuantizer

    torch.manual_seed(0)
    q = ResidualQuantizer(4, 64, 16)
    z = torch.randn(4000, 16)
    q.init_from_data(z, iters=3)
    q.eval()  # no EMA update between the two
    want, _ = q.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got, _ = q(z)
    assert torch.equal(got, want)


def test_row_min_is_torch_min_exactly():
    """The vectorised row minimum gives torch's values and first-index ties: repeated minima, signed zeros,
    infinities, NaN and -inf rows (torch's own path), odd widths; nearest() gives the same codes in any chunking
    (the distances may differ in the last bits: the matrix product rounds by block size)."""
    from rqvae.kmeans import nearest, row_min

    g = torch.Generator().manual_seed(0)
    d = torch.randn(300, 37, generator=g).round(decimals=1)  # rounding makes ties common
    d[0] = 0.0
    d[1] = d[1].abs().clamp_min(0.5)
    d[1, 9], d[1, 4] = -0.0, 0.0  # both minimal: the first (4) wins
    d[2, 3] = float("inf")
    d[3, 7] = float("nan")
    d[4, 1] = float("-inf")
    for block in (d, d[:, :1], d.double()):
        m, i = row_min(block)
        ref_m, ref_i = block.min(1)
        assert torch.equal(i, ref_i) and torch.equal(m.isnan(), ref_m.isnan())
        assert torch.equal(m[~m.isnan()], ref_m[~ref_m.isnan()])
    assert (row_min(d)[1][:2] == torch.tensor([0, 4])).all()
    x, c = torch.randn(5000, 8, generator=g), torch.randn(64, 8, generator=g)
    c[7] = c[3]  # duplicate centroid: the first one wins everywhere
    ref = nearest(x, c, chunk=5000)
    for chunk in (None, 256, 999):
        got = nearest(x, c, chunk=chunk)
        assert torch.equal(got[0], ref[0]) and torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)  # BLAS blocking
    assert not (ref[0] == 7).any()


@pytest.mark.parametrize("field, value", [("commitment_cost", float("nan")), ("lr", float("inf")), ("lr", 0.0),
                                          ("hidden_dims", (0,)), ("hidden_dims", ()), ("kmeans_sample", 0),
                                          ("kmeans_sample", 100), ("codebook_size", 0), ("kmeans_iters", 0),
                                          ("num_quantizers", True), ("pca_dim", -1)])
def test_impossible_settings_are_refused_naming_the_flag(field, value):
    from genrec.core.cli import CliError

    with pytest.raises(CliError, match=f"--{field}"):
        RQVAEConfig(**{field: value})


def test_train_rqvae_refuses_impossible_settings_before_any_work(tmp_path, capsys):
    import train_rqvae

    (tmp_path / "creative_emb").mkdir()
    assert train_rqvae.main(["--data_dir", str(tmp_path), "--kmeans_sample", "0"]) == 2
    assert "--kmeans_sample" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["creative_emb"]


def test_train_rqvae_reads_train_data_path_and_writes_beside_the_data(monkeypatch):
    import train_rqvae

    monkeypatch.setenv("TRAIN_DATA_PATH", "/data/x")
    a = train_rqvae.parse_args([])
    assert a.data_dir == "/data/x" and a.output_dir == "/data/x"


def test_empty_part_files_write_no_ids_and_say_why(tmp_path, caplog):
    folder = tmp_path / "creative_emb" / "emb_81_8"
    folder.mkdir(parents=True)
    (folder / "part-00000").write_text("")
    (folder / "part-00001").write_text('{"anonymous_cid": 5, "emb": [1e30, 0, 0, 0, 0, 0, 0, 0]}\n')
    with caplog.at_level("WARNING"):
        sids, _, rep = generate_semantic_ids(tmp_path, ["81"], RQVAEConfig(**FAST))
    assert sids == {} and "no usable embedding row" in rep["error"]
    assert not (tmp_path / "semantic_id_dict.json").exists()


def test_unusable_or_mismatched_embeddings_are_bad_data_not_a_bug(tmp_path):
    """What the bootstrap degrades on (DataFormatError), not a bare ValueError it would let through as a bug."""
    from genrec.core.safeio import DataFormatError
    from rqvae.generate import build_semantic_ids

    with pytest.raises(DataFormatError, match="no usable embeddings"):
        build_semantic_ids(np.arange(5), np.zeros((5, 8), np.float32), RQVAEConfig(**FAST))
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    model, _ = fit(x, RQVAEConfig(**FAST))
    folder = tmp_path / "creative_emb" / "emb_81_4"
    folder.mkdir(parents=True)
    (folder / "part-00000").write_text("".join(f'{{"anonymous_cid": {i}, "emb": [1, 2, 3, {i}]}}\n' for i in range(9)))
    with pytest.raises(DataFormatError, match="expects 8-d input"):
        generate_semantic_ids(tmp_path, ["81"], RQVAEConfig(**FAST), model)
