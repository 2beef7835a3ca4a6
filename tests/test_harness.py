"""lm-evaluation-harness on compressed models (peft_basis.harness, ``peft-basis eval``), fully offline: a task
defined by a local YAML over a local JSON-lines file, a tiny random Llama with an offline character-level
tokenizer, compressed with Basis Sharing. lm-eval's accuracy must equal the one computed here by scoring the
same choices with the model's own log-likelihoods."""

import json
import sys

import numpy as np
import pytest
import torch
from peft import get_peft_model

import peft_basis
from peft_basis import SharedBasisConfig, calibrate
from peft_basis.cli import main
from peft_basis.data import load_model
from peft_basis.harness import evaluate_lm_eval, load_for_eval, resolve_tasks

from .models import char_tokenizer, tiny_llama, token_batches

TASK = "peft_basis_tiny_sums"
QUESTIONS = [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2), (4, 4), (8, 1)]
# Choices of one length, so the model's preferences (not the choices' lengths) decide its answers; the right
# one (the sum) moves through the four places.
DOCS = [{"question": f"What is {a} plus {b}?",
         "choices": [f"{n:02d}" for n in ([a + b + 1, a * b + 13, a + 2 * b + 20][:i % 4] + [a + b]
                                            + [a + b + 1, a * b + 13, a + 2 * b + 20][i % 4:])],
         "label": i % 4}
        for i, (a, b) in enumerate(QUESTIONS)]


def write_task(folder, cache_dir) -> None:
    """The local-task recipe of docs/evaluation.md: a JSON-lines file and a YAML that reads it with the `json` builder."""
    with open(folder / "sums.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    (folder / "sums.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "sums.jsonl"}
  cache_dir: {cache_dir}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


@torch.no_grad()
def own_loglikelihoods(model, tokenizer) -> np.ndarray:
    """log p(" " + choice | prompt) for every document and choice, from the model's logits directly."""
    scores = []
    for doc in DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        n_context = len(tokenizer.encode(context))
        row = []
        for choice in doc["choices"]:
            ids = torch.tensor([tokenizer.encode(context + " " + choice)])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, n_context:]
            row.append(logprobs[torch.arange(n_context - 1, ids.shape[1] - 1), targets].sum().item())
        scores.append(row)
    return np.array(scores)


def accuracies(scores: np.ndarray) -> tuple[float, float]:
    labels = np.array([d["label"] for d in DOCS])
    lengths = np.array([[len(c) for c in d["choices"]] for d in DOCS], dtype=float)
    return (float(np.mean(scores.argmax(1) == labels)), float(np.mean((scores / lengths).argmax(1) == labels)))


def harness_loglikelihoods(raw) -> np.ndarray:
    samples = sorted(raw["samples"][TASK], key=lambda s: s["doc_id"])
    return np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, root / "datasets_cache")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tiny_llama(layers=2).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    model, tokenizer = load_model(str(base_dir))  # loaded from its folder, so the adapter names it as its base
    dense_scores = own_loglikelihoods(model, tokenizer)
    config = SharedBasisConfig(compression_ratio=0.3, group_size=2)
    calibrate(model, config, token_batches(4), progress=False)
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(adapter_dir)
    return {"tasks": tasks, "base": base_dir, "adapter": adapter_dir, "model": peft_model, "tokenizer": tokenizer,
            "dense_scores": dense_scores}


def test_accuracy_is_the_compressed_models_own_choice_in_memory_merged_and_lean(setup, tmp_path):
    model, tokenizer = setup["model"], setup["tokenizer"]
    scores = own_loglikelihoods(model, tokenizer)
    # the compression changed the model, so a harness that scored the dense weights would be caught below
    assert np.abs(scores - setup["dense_scores"]).max() > 1e-2
    names, manager = resolve_tasks(TASK, str(setup["tasks"]))
    result = evaluate_lm_eval(model, tokenizer, names, task_manager=manager, batch_size=4)

    np.testing.assert_allclose(harness_loglikelihoods(result["lm_eval"]), scores, atol=1e-4)
    acc, acc_norm = accuracies(scores)
    assert result["metrics"][TASK]["acc"] == pytest.approx(acc)
    assert result["metrics"][TASK]["acc_norm"] == pytest.approx(acc_norm)
    assert result["lm_eval"]["n-samples"][TASK]["effective"] == len(DOCS)

    # a merged model, saved as a plain model folder and loaded back, scores the same
    merged_dir = tmp_path / "merged"
    reloaded, _ = load_for_eval(str(setup["adapter"]))
    reloaded.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    merged, merged_tokenizer = load_for_eval(str(merged_dir))
    merged_result = evaluate_lm_eval(merged, merged_tokenizer, names, task_manager=manager, limit=4)
    np.testing.assert_allclose(harness_loglikelihoods(merged_result["lm_eval"]), scores[:4], atol=1e-4)

    # and so does the lean-loaded model (the replaced dense weights never read; docs/evaluation.md suggests it)
    lean = peft_basis.load_lean(str(setup["base"]), str(setup["adapter"]))
    lean_result = evaluate_lm_eval(lean, tokenizer, names, task_manager=manager, limit=4)
    np.testing.assert_allclose(harness_loglikelihoods(lean_result["lm_eval"]), scores[:4], atol=1e-4)


def test_cli_eval_of_the_saved_adapter_gives_the_same_accuracy(setup, tmp_path):
    acc, acc_norm = accuracies(own_loglikelihoods(setup["model"], setup["tokenizer"]))
    assert acc != accuracies(setup["dense_scores"])[0]  # so the score tells the adapter from its base model
    out = tmp_path / "results.json"
    # no --base: the adapter's adapter_config.json names its base model folder
    assert main(["eval", "--model", str(setup["adapter"]), "--tasks", TASK, "--include-path", str(setup["tasks"]),
                 "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["base"] == str(setup["base"])
    assert saved["metrics"][TASK]["acc"] == pytest.approx(acc)
    assert saved["metrics"][TASK]["acc_norm"] == pytest.approx(acc_norm)
    assert saved["lm_eval"]["results"][TASK]["acc,none"] == pytest.approx(acc)


def test_without_lm_eval_the_error_says_what_to_install(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'peft-basis\[eval\]'"):
        evaluate_lm_eval(tiny_llama(layers=1), char_tokenizer(), ["arc_easy"])
    with pytest.raises(SystemExit, match=r"pip install 'peft-basis\[eval\]'"):
        main(["eval", "--model", str(setup["adapter"]), "--tasks", "arc_easy"])  # before any model is loaded


def test_bad_arguments_are_clear_errors_before_any_model_is_loaded(setup, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(peft_basis.harness, "load_for_eval", no_loading)
    tasks = ["--tasks", TASK, "--include-path", str(setup["tasks"])]
    with pytest.raises(SystemExit, match="is not a folder: pass an adapter folder"):
        main(["eval", "--model", str(tmp_path / "missing"), *tasks])
    with pytest.raises(SystemExit, match="holds neither adapter_config.json"):
        main(["eval", "--model", str(tmp_path), *tasks])
    with pytest.raises(SystemExit, match="not a local Hugging Face model folder.*--base"):
        main(["eval", "--model", str(setup["adapter"]), "--base", str(tmp_path / "nowhere"), *tasks])
    with pytest.raises(SystemExit, match="full model folder, not an adapter"):
        main(["eval", "--model", str(setup["base"]), "--base", str(setup["base"]), *tasks])
    with pytest.raises(SystemExit, match="No lm-eval task given"):
        main(["eval", "--model", str(setup["adapter"]), "--tasks", " , "])
    with pytest.raises(SystemExit, match="--limit must be positive"):
        main(["eval", "--model", str(setup["adapter"]), "--limit", "0", *tasks])
    with pytest.raises(SystemExit, match="--batch-size"):
        main(["eval", "--model", str(setup["adapter"]), "--batch-size", "big", *tasks])
    with pytest.raises(SystemExit, match=r"Unknown lm-eval task\(s\) \['peft_basis_tiny_sum'\].*did you mean "
                                         "peft_basis_tiny_sums.*--include-path"):
        main(["eval", "--model", str(setup["adapter"]), "--tasks", "peft_basis_tiny_sum",
              "--include-path", str(setup["tasks"])])

    # an adapter that does not name its base model (made on a model built in memory) asks for --base
    unnamed = tmp_path / "unnamed"
    model = tiny_llama(layers=1)
    config = SharedBasisConfig(compression_ratio=0.3)
    calibrate(model, config, token_batches(1), progress=False)
    get_peft_model(model, config).save_pretrained(unnamed)
    with pytest.raises(SystemExit, match="does not name its base model.*--base"):
        main(["eval", "--model", str(unnamed), *tasks])
