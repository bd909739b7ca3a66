"""``tokentrail verify`` on conversations recorded through TokenTrail from the real CPU vLLM: the exports
pass (token-in and default mode), and each of four faults a trainer could make fails it.

The faults are made from the token-in export the way a trainer would make them: the sequence shifted by
one token; the loss mask (with the logprobs aligned to it) off by one; each reply replaced by the
re-tokenization of its text; the right tokens scored with other weights. The tiny model's recorded
logprobs are close to uniform (about -8.3), but the model and vLLM agree to 0.005, so a tolerance of
0.05 separates them from every fault by a wide margin (the figures are printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_proxy
from tokentrail.proxy.training.verify import (
    Scorer,
    SequenceCheck,
    VerifyError,
    compare,
    read_export,
    verify,
)

CHAT = "/v1/chat/completions"
QUESTIONS = ["What is 17 * 19?", "Are you sure? Show the steps.", "Now 23 * 29, please."]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# ---- the comparison alone (no model) ----


def _row(input_ids: list[int], mask: list[int], logprobs: list[float | None]) -> dict[str, Any]:
    return {"trajectory_id": "t", "sequence_index": 0, "input_ids": input_ids, "loss_mask": mask,
            "logprobs": logprobs}  # fmt: skip


def test_compare_counts_tokens_over_the_tolerance_and_masked_tokens_without_a_logprob() -> None:
    row = _row([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], [None, None, -1.0, -2.0, None])
    check = compare(row, {2: -1.01, 3: -2.5}, tolerance=0.05)
    assert (check.compared, check.over_tolerance, check.first_over) == (2, 1, 3)
    assert (check.missing, check.first_missing) == (1, 4)
    assert check.max_abs_delta == pytest.approx(0.5)
    assert check.mean_abs_delta == pytest.approx(0.255)
    assert not check.ok
    assert compare(row, {2: -1.0, 3: -2.0, 4: -3.0}, 0.05).missing == 1  # no recorded logprob at 4
    assert SequenceCheck("t", 0, compared=3).ok


# ---- on the real vLLM ----


def _converse(proxy: str, trajectory_id: str, *, logprobs: bool = True, tags: str = "") -> None:
    """Three turns as an agent sends them: the whole history, each reply back as text."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    headers = {"X-Trajectory-Id": trajectory_id, **({"X-Trajectory-Tags": tags} if tags else {})}
    with httpx.Client(timeout=120) as client:
        for turn, question in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": question})
            body = {"model": "tiny", "messages": messages, "max_tokens": 16, "temperature": 1.0,
                    "seed": 1000 * turn + len(trajectory_id), "logprobs": logprobs}  # fmt: skip
            response = client.post(proxy + CHAT, json=body, headers=headers)
            assert response.status_code == 200, response.text
            messages.append(
                {"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]}
            )


@pytest.fixture(scope="module")
def exports(vllm_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same three conversations recorded with token-in (JSONL) and without (Parquet), plus one
    conversation without logprobs (tagged ``logprobs=none``) in the token-in database."""
    out: dict[str, Path] = {}
    for mode, token_in, fmt in [("token_in", True, "jsonl"), ("default", False, "parquet")]:
        folder = tmp_path_factory.mktemp(f"verify-{mode}")
        with running_proxy(vllm_url, folder, token_in=token_in) as proxy:
            for name in ["conv-a", "conv-bb", "conv-ccc"]:
                _converse(proxy.url, name, tags="logprobs=yes")
            if token_in:
                _converse(proxy.url, "conv-nolp", logprobs=False, tags="logprobs=none")
            proxy.wait_all_records()
            out[f"{mode}_db"] = Path(proxy.db_url.removeprefix("sqlite:///"))
            path = folder / f"{mode}.{fmt}"
            done = _cli("export", "--format", fmt, "--out", str(path), "--db", proxy.db_url,
                        "--tag", "logprobs=yes")  # fmt: skip
            assert done.returncode == 0, done.stderr
            print(f"\n{mode} export: {done.stdout.strip()}")
            out[mode] = path
    return out


@pytest.fixture(scope="module")
def scorer(tiny_model_dir: Path) -> Scorer:
    return Scorer(tiny_model_dir, device="cpu")


@pytest.mark.vllm
def test_token_in_and_default_mode_exports_pass_from_a_file_and_from_the_database(
    exports: dict[str, Path], tiny_model_dir: Path
) -> None:
    figures = {}
    for mode in ["token_in", "default"]:
        done = _cli("verify", "--model", str(tiny_model_dir), str(exports[mode]), "--device", "cpu")
        assert done.returncode == 0, done.stdout + done.stderr
        summary = done.stdout.strip().splitlines()[-1]
        assert summary.startswith("PASS: "), summary
        figures[mode] = summary
    from_db = _cli("verify", "--model", str(tiny_model_dir), "--db", f"sqlite:///{exports['token_in_db']}",
                   "--tag", "logprobs=yes", "--json")  # fmt: skip
    assert from_db.returncode == 0, from_db.stderr
    report = json.loads(from_db.stdout)
    assert report["passed"] is True
    assert report["sequences"] == 3  # token-in: each conversation is one sequence
    assert report["max_abs_delta"] < 0.05
    print("\n" + "\n".join(f"verify {mode}: {line}" for mode, line in figures.items()))


@pytest.mark.vllm
def test_an_export_without_logprobs_and_a_model_whose_vocabulary_does_not_fit_are_refused(
    exports: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    db = f"sqlite:///{exports['token_in_db']}"
    done = _cli("verify", "--model", str(tiny_model_dir), "--db", db, "--tag", "logprobs=none")
    assert done.returncode == 2
    assert "no logprobs" in done.stderr
    assert "Traceback" not in done.stderr

    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    done = _cli("verify", "--model", str(tmp_path / "small"), str(exports["token_in"]))
    assert done.returncode == 2
    assert "outside the model's vocabulary of 64" in done.stderr
    done = _cli("verify", "--model", str(tmp_path / "nothing"), str(exports["token_in"]))
    assert (done.returncode, "cannot load the model" in done.stderr) == (2, True)


def _shifted(row: dict[str, Any]) -> dict[str, Any]:
    """Fault 1: the tokens moved one place right (a stray token in front), mask and logprobs not."""
    return {**row, "input_ids": [row["input_ids"][0], *row["input_ids"][:-1]]}


def _mask_off_by_one(row: dict[str, Any]) -> dict[str, Any]:
    """Fault 2: the loss mask one place late, the logprobs moved with it (as a trainer that lines the
    completion's logprobs up with its own mask would have them)."""
    return {**row, "loss_mask": [0, *row["loss_mask"][:-1]], "logprobs": [None, *row["logprobs"][:-1]]}


def _retokenized(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Fault 3: every reply (a run of the mask) replaced by the encoding of its decoded text, its
    recorded logprobs kept by position, as a trainer that re-tokenizes the conversation would have."""
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float | None] = []
    position = 0
    total = len(row["input_ids"])
    while position < total:
        end = position + 1
        while end < total and row["loss_mask"][end] == row["loss_mask"][position]:
            end += 1
        run = row["input_ids"][position:end]
        if row["loss_mask"][position]:
            text = tokenizer.decode(run, skip_special_tokens=False)
            again = tokenizer.encode(text, add_special_tokens=False)
            recorded = row["logprobs"][position:end]
            ids += again
            mask += [1] * len(again)
            logprobs += (recorded + [None] * len(again))[: len(again)]
        else:
            ids += run
            mask += [0] * len(run)
            logprobs += [None] * len(run)
        position = end
    return {**row, "input_ids": ids, "loss_mask": mask, "logprobs": logprobs}


@pytest.fixture(scope="module")
def other_weights(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fault 4's weights: the tiny model with a deterministic change to every weight, a quarter of
    their spread (a checkpoint some steps away from the one that sampled). A change of 2% moves the
    flat tiny model's logprobs by only 0.008 on average (max 0.024), under the tolerance: the loop's
    test (test_grpo_training.py) shows one real optimiser step is caught."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.25 * float(weight.std()))
    out = tmp_path_factory.mktemp("other-weights")
    model.to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.mark.vllm
def test_each_of_four_faults_fails_verify(
    exports: dict[str, Path], scorer: Scorer, tiny_model_dir: Path, other_weights: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    rows = list(read_export(exports["token_in"]))
    clean = verify(scorer, rows)
    assert clean.passed(), clean.line()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    retokenized = [_retokenized(r, tokenizer) for r in rows]
    changed = sum(a["input_ids"] != b["input_ids"] for a, b in zip(rows, retokenized, strict=True))
    assert changed, "no reply re-tokenizes differently: the fault would not be there"
    faults = {
        "shifted by one token": verify(scorer, [_shifted(r) for r in rows]),
        "loss mask off by one": verify(scorer, [_mask_off_by_one(r) for r in rows]),
        "reply re-tokenized from text": verify(scorer, retokenized),
        "wrong weights": verify(Scorer(other_weights, device="cpu"), rows),
    }
    lines = [f"  clean: {clean.line()}"] + [f"  {name}: {report.line()}" for name, report in faults.items()]
    print("\nverify on the token-in export:\n" + "\n".join(lines))
    for name, report in faults.items():
        assert not report.passed(), name
        assert report.first_failure is not None, name
    # the margin: the smallest fault's mean |Δ| is many times the clean export's largest
    assert min(r.mean_abs_delta for r in faults.values()) > 5 * clean.max_abs_delta

    # only the mask moved (logprobs where they were): the first masked token of each reply has none
    mask_only = [{**r, "loss_mask": [0, *r["loss_mask"][:-1]]} for r in rows]
    report = verify(scorer, mask_only)
    assert report.missing >= len(rows)
    assert not report.passed()

    # the CLI says so with exit code 1 and where it first went wrong
    faulty = tmp_path / "shifted.jsonl"
    faulty.write_text("".join(json.dumps(_shifted(r)) + "\n" for r in rows))
    done = _cli("verify", "--model", str(tiny_model_dir), str(faulty), "--quiet")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("FAIL: ")
    assert "first at conv-" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl"], "no file missing.jsonl"),
        (["rows.jsonl", "--db", "sqlite:///x.db"], "--db select from the database"),
        (["rows.jsonl", "--tag", "a=b", "--by-group"], "--tag, --by-group select from the database"),
    ],
)
def test_bad_verify_input_is_refused_before_loading_a_model(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "rows.jsonl").write_text("{}\n")
    done = subprocess.run(
        [sys.executable, "-m", "tokentrail.proxy.cli", "verify", "--model", "no-such-model", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_file_that_is_not_an_export_is_named(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 2]}\n')
    with pytest.raises(VerifyError, match="has no loss_mask, logprobs: is it a tokentrail export"):
        list(read_export(rows))
    rows.write_text("not json\n")
    with pytest.raises(VerifyError, match=r"rows\.jsonl:1: not a JSON line"):
        list(read_export(rows))


def test_the_scorer_keeps_only_the_masked_rows_and_agrees_with_a_full_forward_pass(tmp_path: Path) -> None:
    """logits_to_keep and the fallback for a model without it give the logprobs of a plain pass."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    scorer = Scorer(tmp_path, device="cpu")
    ids, positions = [1, 5, 9, 3, 7, 2], [2, 3, 5]
    with torch.inference_mode():
        full = torch.log_softmax(scorer.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = {p: float(full[p - 1, ids[p]]) for p in positions}
    assert scorer.logprobs(ids, positions) == pytest.approx(expected, abs=1e-5)

    inner = scorer.model

    class WithoutLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids: Any) -> Any:
            return inner(input_ids=input_ids)

    scorer.model = WithoutLogitsToKeep()
    assert scorer.logprobs(ids, positions) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(VerifyError, match="token ID -1 is outside the model's vocabulary of 50"):
        scorer.logprobs([1, -1, 3], [2])


def test_verify_without_torch_says_which_extra_to_install(tmp_path: Path) -> None:
    """The import is lazy: a machine without torch gets the hint, not a traceback."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from tokentrail.proxy.training.verify import Scorer, VerifyError\n"
        "try:\n    Scorer('x')\nexcept VerifyError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'tokentrail[verify]'" in done.stdout
    assert VerifyError.__mro__[1] is ValueError
