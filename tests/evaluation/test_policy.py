"""The demo's toy world, the evaluation maths (KL against exact enumeration), and the demo, eval
and plot commands end to end."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch

from prefopt.demo import world
from prefopt.errors import PrefoptError
from prefopt.evaluation.policy import Sample, kl_estimates, sample, sample_logps, win_rate
from prefopt.evaluation.scorers import load_scorer


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------- toy world


def test_scorer_on_known_texts():
    texts = [
        "the plot was great .",                 # +2
        "the plot was great.",                  # the decoder glues the full stop: still +2
        "the film was good but the music was awful.",  # +1 - 2
        "the cast was long and the music was fine",     # 0 + 0.5
        "nothing here",                         # 0
        "",                                      # 0
    ]
    expected = [_sig(0.75 * 2), _sig(0.75 * 2), _sig(0.75 * -1), _sig(0.75 * 0.5), 0.5, 0.5]
    assert world.sentiment_score(texts) == pytest.approx(expected, abs=1e-12)
    assert all(0 < s < 1 for s in world.sentiment_score(["superb " * 10, "awful " * 10]))


def test_generator_grammar_and_moods():
    vocab = set(world.vocabulary())
    adjectives = set(world.POSITIVE) | set(world.NEGATIVE) | set(world.NEUTRAL)
    rng = random.Random(0)
    for _ in range(200):
        prompt, completion = world.make_review(rng)
        p, c = prompt.split(), completion.split()
        assert set(p) | set(c) <= vocab
        assert tuple(p[:-3]) in world.OPENERS and p[-3] == "the" and p[-3 + 1] in world.NOUNS and p[-1] == "was"
        # ADJ (and|but the NOUN was ADJ){1,3} .
        assert c[-1] == "." and c[0] in adjectives
        body = c[1:-1]
        assert len(body) % 5 == 0 and 1 <= len(body) // 5 <= 3
        for k in range(0, len(body), 5):
            conj, the, noun, was, adj = body[k : k + 5]
            assert conj in ("and", "but") and the == "the" and noun in world.NOUNS and was == "was"
            assert adj in adjectives
    # Same seed, same reviews; the mood decides the sentiment.
    assert world.make_reviews(20, seed=3) == world.make_reviews(20, seed=3)
    mean = {}
    for mood in world.MOODS:
        rng = random.Random(1)
        texts = [" ".join(world.make_review(rng, mood)) for _ in range(400)]
        mean[mood] = sum(world.sentiment_score(texts)) / len(texts)
    assert mean["positive"] > 0.7 > 0.3 > mean["negative"]
    assert 0.4 < mean["mixed"] < 0.6


def test_build_pairs_on_known_inputs():
    prompts = ["p1", "p2"]
    comps = [["a", "b", "c", "d", "e"], ["x", "x", "y", "z"]]
    scores = [[0.2, 0.7, 0.5, 0.5, 0.9], [0.1, 0.3, 0.8, 0.4]]
    rows, ties = world.build_pairs(prompts, comps, scores)
    # p1: (a,b) -> b wins; (c,d) tie skipped; e has no partner. p2: (x,x) identical skipped; (y,z) -> y.
    assert rows == [
        {"prompt": "p1", "chosen": "b", "rejected": "a", "score_chosen": 0.7, "score_rejected": 0.2},
        {"prompt": "p2", "chosen": "y", "rejected": "z", "score_chosen": 0.8, "score_rejected": 0.4},
    ]
    assert ties == 2


def test_load_scorer_dispatch_and_errors():
    score = load_scorer("prefopt.demo.world:sentiment_score")
    assert score(["great", "awful"]) == pytest.approx([_sig(1.5), _sig(-1.5)])
    for bad in ("prefopt.demo.world", "no_such_module_xyz:f", "prefopt.demo.world:nope", "prefopt.demo.world:SCORE_SCALE"):
        with pytest.raises(PrefoptError):
            load_scorer(bad)
    # Callables that are not scorers: a string instead of a list, wrong number of scores, non-numbers.
    with pytest.raises(PrefoptError, match="returned str 'a', expected a list of 2 numbers"):
        load_scorer("os.path:commonprefix")(["ab", "ac"])  # -> "a"
    with pytest.raises(PrefoptError, match="1 scores for 2 texts"):
        load_scorer("builtins:set")(["x", "x"])  # -> {"x"}
    with pytest.raises(PrefoptError, match="returned str 'x' for text 0, expected a number"):
        load_scorer("builtins:sorted")(["x"])


# ---------------------------------------------------------------------------- KL and win rate


def test_kl_estimates_by_hand():
    # log ratios 1 and 0: k1 = 0.5; k3 = mean(e^-1 - 1 + 1, e^0 - 1 + 0) = e^-1 / 2
    est = kl_estimates(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert est["kl"] == pytest.approx(0.5)
    assert est["kl_k3"] == pytest.approx(math.exp(-1) / 2)
    assert est["kl_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert win_rate([0.9, 0.1, 0.5, 0.7], [0.1, 0.9, 0.5, 0.2]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# A bigram LM whose next-token logits we set: a 1-layer Llama whose attention and MLP add nothing
# (o_proj and down_proj are zero), one-hot embeddings, RMSNorm that leaves one-hot vectors one-hot,
# and an lm_head whose column i holds the logits after token i.
PAD, BOS, EOS, A, B = range(5)
V = 5
NEG = -1e4  # exp underflows to exactly 0: pad and bos are never generated


def _bigram_model(table: torch.Tensor):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-12,
                         max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        model.model.norm.weight.fill_(1 / math.sqrt(V))  # rms of a one-hot row is 1/sqrt(V)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(table.T)  # logits[j] = table[prev, j]
    return model.eval()


def _table(shift: float = 0.0) -> torch.Tensor:
    t = torch.full((V, V), NEG)
    t[BOS, [A, B, EOS]] = torch.tensor([0.5, 0.0, -1.0]) + torch.tensor([shift, 0.0, 0.0])
    t[A, [A, B, EOS]] = torch.tensor([-0.5, 0.3, 0.0]) + torch.tensor([0.0, -shift, 0.5 * shift])
    t[B, [A, B, EOS]] = torch.tensor([0.2, 0.2, -0.3])
    t[EOS, [A, B, EOS]] = 0.0  # never reached: generation stops at EOS
    t[PAD, [A, B, EOS]] = 0.0
    return t


def _enumerate(table: torch.Tensor, max_len: int) -> dict[tuple, float]:
    """Every completion of prompt [BOS] up to ``max_len`` tokens (ending at EOS or cut at
    max_len) with its exact log-probability under the bigram table."""
    logp = torch.log_softmax(table.double(), dim=-1)
    out = {}
    for n in range(1, max_len + 1):
        for seq in itertools.product((A, B, EOS), repeat=n):
            if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                continue
            prev, total = BOS, 0.0
            for tok in seq:
                total += float(logp[prev, tok])
                prev = tok
            out[seq] = total
    return out


def test_kl_matches_enumeration_on_a_bigram_model():
    max_len = 3
    ref, pol = _bigram_model(_table()), _bigram_model(_table(shift=1.0))
    exact_ref, exact_pol = _enumerate(_table(), max_len), _enumerate(_table(1.0), max_len)
    probs = {y: math.exp(lp) for y, lp in exact_pol.items()}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    exact_kl = sum(p * (exact_pol[y] - exact_ref[y]) for y, p in probs.items())
    assert exact_kl > 0.05  # the shift makes a real difference

    # 1. The evaluation's log-probs of every possible completion equal the enumerated ones, so
    #    the KL they imply (weighted by the exact probabilities) is the exact KL.
    seqs = list(exact_pol)
    enum_samples = [Sample(0, k, [BOS], list(y)) for k, y in enumerate(seqs)]
    lp_pol = sample_logps(pol, enum_samples, pad_token_id=PAD)
    lp_ref = sample_logps(ref, enum_samples, pad_token_id=PAD)
    assert lp_pol.tolist() == pytest.approx([exact_pol[y] for y in seqs], abs=1e-4)
    assert lp_ref.tolist() == pytest.approx([exact_ref[y] for y in seqs], abs=1e-4)
    weighted = sum(probs[y] * (a - b) for y, a, b in zip(seqs, lp_pol.tolist(), lp_ref.tolist()))
    assert weighted == pytest.approx(exact_kl, abs=1e-4)

    # 2. Sampling with generate follows the policy's distribution, and the Monte Carlo estimates
    #    land on the exact value (within 4 standard errors; the seed makes this deterministic).
    n = 2000
    drawn = sample(pol, [[BOS]], num_samples=n, max_new_tokens=max_len, pad_token_id=PAD, eos_token_id=EOS,
                   seed=0, batch_size=n)
    freq = {y: 0 for y in seqs}
    for s in drawn:
        freq[tuple(s.completion_ids)] += 1
    assert max(abs(freq[y] / n - probs[y]) for y in seqs) < 0.03
    est = kl_estimates(sample_logps(pol, drawn, pad_token_id=PAD), sample_logps(ref, drawn, pad_token_id=PAD))
    assert abs(est["kl"] - exact_kl) < 4 * est["kl_stderr"]
    assert est["kl_k3"] == pytest.approx(exact_kl, rel=0.15)

    # 3. A model against itself: exactly zero, for both estimators.
    same = kl_estimates(sample_logps(pol, drawn, pad_token_id=PAD), sample_logps(pol, drawn, pad_token_id=PAD))
    assert same["kl"] == 0.0 and same["kl_k3"] == 0.0

    # 4. Same seed, same samples; another seed, other samples.
    def draw(seed):
        got = sample(pol, [[BOS], [BOS, A]], num_samples=100, max_new_tokens=max_len, pad_token_id=PAD,
                     eos_token_id=EOS, seed=seed, batch_size=64)
        return [(s.prompt_index, s.sample_index, s.completion_ids) for s in got]

    assert draw(1) == draw(1) != draw(2)


def test_sampled_logps_match_generate_with_left_padding(tiny_llama):
    """Prompts of different lengths are left-padded for generate and right-padded for scoring: the
    log-probs ``sample_logps`` gives must equal generate's own, or the KL would be measured on a
    different distribution than the one sampled."""
    from prefopt.evaluation.policy import encode_prompts
    from prefopt.modeling.load import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(str(tiny_llama)), load_causal_lm(str(tiny_llama))
    ids = encode_prompts(tok, ["the movie", "a film with a really quite dull plot", "it"])
    assert len({len(p) for p in ids}) == 3 and all(p[0] == tok.bos_token_id for p in ids)
    width = max(map(len, ids))
    inp = torch.full((3, width), tok.pad_token_id)
    att = torch.zeros((3, width), dtype=torch.long)
    for r, p in enumerate(ids):
        inp[r, width - len(p):], att[r, width - len(p):] = torch.tensor(p), 1
    torch.manual_seed(0)
    g = model.generate(input_ids=inp, attention_mask=att, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, output_logits=True,
                       return_dict_in_generate=True)
    step_logps = torch.stack(g.logits, 1).float().log_softmax(-1)  # [3, T, V]
    samples, expected = [], []
    for r in range(3):
        toks = g.sequences[r, width:].tolist()
        if tok.eos_token_id in toks:
            toks = toks[: toks.index(tok.eos_token_id) + 1]
        samples.append(Sample(r, 0, ids[r], toks))
        expected.append(sum(step_logps[r, t, x].item() for t, x in enumerate(toks)))
    assert sample_logps(model, samples, pad_token_id=tok.pad_token_id).tolist() == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------- commands end to end

REPORT_FIELDS = ("method", "beta", "alpha", "reward", "kl", "accuracy")


@pytest.mark.slow
def test_demo_quick_eval_and_plot_end_to_end(cli, cli_here, tmp_path):
    """The demo in a real process with stderr piped, as `make demo > log`; the commands that read
    its output in this process (``cli_here``), since their process boundary is not the point."""
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--output_dir", out)
    assert res.returncode == 0, res.stderr
    for stage in range(1, 8):
        assert f"[{stage}/7]" in res.stderr
    # Progress in a log: whole lines, no bar redraws; every training run (SFT, the reward model, the
    # five offline runs, the two online runs' round) ends with its closing line.
    assert "\r" not in res.stderr
    assert len(re.findall(r"^sft: 120/120 step \(100%\) \[", res.stderr, re.M)) == 1
    assert len(re.findall(r"^train: (\d+)/\1 step \(100%\) \[.*\] loss=", res.stderr, re.M)) == 8
    report = json.loads((out / "report.json").read_text())
    runs = report["runs"]
    assert [r["method"] for r in runs] == ["sft", "dpo", "odpo", "dpo_noisy", "dpo_rm_filtered", "odpo_rm",
                                           "online_dpo", "online_odpo"]
    for r in runs:
        assert all(k in r for k in REPORT_FIELDS), r
    assert runs[0]["kl"] == 0.0 and runs[0]["accuracy"] is None
    assert runs[2]["alpha"] == 0.5 and runs[1]["alpha"] is None
    # Where labels and offsets came from (issue 5), and the reward model's numbers.
    assert [(r["labels"], r["offsets"]) for r in runs] == [
        (None, None), ("scorer", None), ("scorer", "scorer"), ("bt_noise", None), ("bt_noise_rm_agrees", None),
        ("bt_noise", "reward_model"), ("scorer_online", None), ("scorer_online", "scorer")]
    assert [r["beta"] for r in runs[3:6]] == [1.0, 1.0, 1.0] and (runs[4]["alpha"], runs[5]["alpha"]) == (None, 0.5)
    # The online runs (`prefopt online`'s code): their rounds on disk, the spread over seeds in the report.
    assert (runs[6]["alpha"], runs[7]["alpha"], runs[6]["seed"]) == (None, 0.5, 0)
    online_dir = out / "runs" / runs[7]["name"]
    assert (online_dir / "rounds" / "1" / "pairs.jsonl").is_file() and (online_dir / "model.safetensors").is_file()
    assert [(r["method"], r["seeds"], r["reward"]) for r in report["online_spread"]] == [
        ("online_dpo", 1, runs[6]["reward"]), ("online_odpo", 1, runs[7]["reward"])]
    rm = report["reward_model"]
    assert 0.0 <= rm["heldout_accuracy"] <= 1.0 and rm["heldout_pairs"] == report["data"]["heldout"]["pairs"]
    assert rm["train_pairs"] == report["data"]["train"]["pairs"]
    noisy = report["data"]["train_noisy"]
    assert noisy["pairs"] == report["data"]["train"]["pairs"] and 0 < noisy["flipped"] < noisy["pairs"]
    md = (out / "report.md").read_text()
    assert "| dpo_beta1.0 | dpo |" in md and "| sft | sft |" in md
    assert "| odpo_rm_beta1.0_alpha0.5 | odpo_rm | bt_noise | reward_model |" in md and "Reward model" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = [json.loads(line) for line in (out / "data" / "train_pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    assert all(world.sentiment_score([f"{p['prompt']} {p['chosen']}"])[0] == pytest.approx(p["score_chosen"])
               for p in pairs)
    # The noisy labels: the same pairs, no scores, `flipped` of them swapped.
    labelled = [json.loads(line) for line in (out / "data" / "train_pairs_noisy.jsonl").read_text().splitlines()]
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in labelled)
    assert sum(r["chosen"] == p["rejected"] and r["rejected"] == p["chosen"] for r, p in zip(labelled, pairs)) \
        == noisy["flipped"]
    # The learned offsets are `prefopt reward score` of the reward model on those labels, and the held-out
    # accuracy is `prefopt reward eval` on the ground-truth ordered held-out pairs.
    scored = tmp_path / "rescored.jsonl"
    res = cli_here("reward", "score", "--model", out / "reward_model", "--dataset", out / "data" / "train_pairs_noisy.jsonl",
              "--output", scored, "--max_length", 64, "--max_prompt_length", 32, "--batch_size", 64)
    assert res.returncode == 0, res.stderr
    ours = [json.loads(line) for line in (out / "data" / "train_pairs_noisy_rm.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(ours) == len(theirs) == len(labelled)
    for a, b, r in zip(ours, theirs, labelled):
        assert (a["chosen"], a["rejected"]) == (r["chosen"], r["rejected"])
        assert a["score_chosen"] == pytest.approx(b["score_chosen"], abs=1e-5)
        assert a["score_rejected"] == pytest.approx(b["score_rejected"], abs=1e-5)
    assert sum(not a["score_chosen"] > a["score_rejected"] for a in ours) == rm["train_pairs_rm_disagrees"]
    assert rm["train_pairs_flipped"] == noisy["flipped"]
    assert rm["train_pairs_rm_disagrees_flipped"] == sum(
        not a["score_chosen"] > a["score_rejected"] and a["chosen"] != p["chosen"] for a, p in zip(ours, pairs))
    res = cli_here("reward", "eval", "--model", out / "reward_model", "--dataset", out / "data" / "heldout_pairs.jsonl",
              "--max_length", 64, "--max_prompt_length", 32)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(rm["heldout_accuracy"],
                                                                                         abs=1e-4)
    odpo_rm_summary = json.loads((out / "runs" / "odpo_rm_beta1.0_alpha0.5" / "data_summary.json").read_text())
    assert odpo_rm_summary["train"]["nonpositive_score_diff"] == rm["train_pairs_rm_disagrees"]
    # The control run trains on exactly the pairs the learned-offset run keeps, without scores.
    agreed = [json.loads(line) for line in (out / "data" / "train_pairs_noisy_rm_agrees.jsonl").read_text().splitlines()]
    assert agreed == [{"prompt": a["prompt"], "chosen": a["chosen"], "rejected": a["rejected"]}
                      for a in ours if a["score_chosen"] > a["score_rejected"]]
    assert odpo_rm_summary["train"]["tokenization"]["pairs_kept"] == len(agreed)

    # `prefopt eval` with the demo's sampling settings reproduces the demo's numbers for that run.
    dpo = runs[1]
    s = report["settings"]
    ev = tmp_path / "eval"
    res = cli_here("eval", "--model", out / "runs" / "dpo_beta1.0", "--ref", out / "sft",
              "--prompts", out / "data" / "eval_prompts.jsonl", "--scorer", report["scorer"],
              "--num_samples", s["eval_samples"], "--max_new_tokens", s["max_new_tokens"], "--seed", s["seed"] + 4,
              "--batch_size", 64, "--pairs", out / "data" / "heldout_pairs.jsonl", "--output_dir", ev)
    assert res.returncode == 0, res.stderr
    got = json.loads((ev / "eval_dpo_beta1.0.json").read_text())
    assert (got["method"], got["beta"], got["alpha"]) == ("dpo", 1.0, None)  # read from the run's config.yaml
    for key in ("reward", "kl", "kl_k3", "win_rate", "accuracy"):
        assert got[key] == pytest.approx(dpo[key], abs=1e-4), key
    assert got["reward_ref"] == pytest.approx(runs[0]["reward"], abs=1e-4)
    assert (ev / "frontier.png").exists()

    # `prefopt plot` on the demo directory: training curves and frontier.
    (out / "frontier.png").unlink()
    res = cli_here("plot", out)
    assert res.returncode == 0, res.stderr
    assert (out / "training_curves.png").exists() and (out / "frontier.png").exists()

    # Input errors are one line and exit status 2.
    res = cli_here("eval", "--model", out / "runs" / "dpo_beta1.0", "--ref", out / "sft", "--prompts",
              out / "data" / "eval_prompts.jsonl", "--scorer", "no_such_module_xyz:f", "--output_dir", ev)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "no_such_module_xyz" in res.stderr
    res = cli_here("plot", tmp_path / "missing")
    assert res.returncode == 2 and "Traceback" not in res.stderr
