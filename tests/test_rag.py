"""Retrieval-augmented answering (`retrieve:`): BM25 ranking, the index cached in the run
directory, training rows that carry the retrieved (not the gold) passages, and the RAG program
on the tiny model through the same template at inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, FIXTURE_SPLITS

from copa.checks import check_recipe
from copa.data import read_jsonl
from copa.data.loaders import squad_rows
from copa.data.retrieval import INDEX_DIR, META_FILE, build_retriever, index_for, load_retriever
from copa.recipe import RecipeError, load_recipe
from copa.stages.render import render

REPO = Path(__file__).resolve().parent.parent
SQUAD = FIXTURE_DATA / "squad" / "dev-v2.0-subset.json"
CORPUS = ["Bees make honey from the nectar of flowers.",
          "The Danube flows through Vienna and Budapest.",
          "Copper conducts electricity well and is used in wires.",
          "Honey never spoils if it is kept sealed."]


def test_a_corpus_row_holding_a_list_is_refused_not_indexed_as_its_repr(tmp_path: Path) -> None:
    from copa.data.retrieval import corpus_passages

    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": 1}, {"text": CORPUS[0]}, {"text": None}, {"text": ["a", "b"]}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="^row 4 has a list for 'text', where a passage's text"):
        corpus_passages(corpus)
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert corpus_passages(corpus) == [CORPUS[0]]  # row 1 lacks it, row 3 is null: no passage


def test_bm25_ranks_the_obvious_passage_first(tmp_path: Path) -> None:
    retriever = build_retriever(CORPUS, k=2)
    assert retriever.search("Which river flows through Vienna?")[0] == CORPUS[1]
    assert retriever.search("What is copper used in?")[0] == CORPUS[2]
    top = retriever.search("how do bees make honey", k=3)
    assert top[:2] == [CORPUS[0], CORPUS[3]] and len(top) == 3
    # No known word: every score is 0 and the corpus order decides, never chance.
    assert retriever.search("zzz qqq") == CORPUS[:2]
    assert retriever.search("") == CORPUS[:2]
    assert len(retriever.search("honey", k=10)) == 4  # k is capped at the corpus size
    # Saved and loaded, it ranks the same.
    from copa.data.retrieval import save_retriever

    save_retriever(retriever, tmp_path / "index", {"corpus": "test"})
    loaded = load_retriever(tmp_path / "index", k=2)
    for query in ("Vienna river", "copper wires", "honey", "zzz"):
        assert loaded.search(query) == retriever.search(query)


def _rag_recipe(tmp_path: Path, model: str = "smollm2-135m-instruct", k: int = 1,
                extra: dict | None = None):
    overrides = {"data.splits": FIXTURE_SPLITS["squad_rag"], "retrieve.k": k,
                 "run_dir": str(tmp_path / "run"), "model.base": model, **(extra or {})}
    return load_recipe(REPO / "recipes" / "squad_rag.yaml", overrides=overrides)


def test_the_index_is_built_once_and_rebuilt_when_the_corpus_changes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("text\n" + "\n".join(CORPUS) + "\n")
    recipe = _rag_recipe(tmp_path, extra={"retrieve.corpus": str(corpus),
                                          "retrieve.format": "auto"})
    folder = tmp_path / INDEX_DIR
    first = index_for(recipe, folder)
    built = (folder / META_FILE).stat().st_mtime_ns
    again = index_for(recipe, folder)
    assert (folder / META_FILE).stat().st_mtime_ns == built  # loaded, not rebuilt
    assert again.passages == first.passages == CORPUS
    corpus.write_text("text\nOnly one passage now.\n")
    assert index_for(recipe, folder).passages == ["Only one passage now."]


def test_rag_training_rows_carry_the_retrieved_passages_not_the_gold_one(tmp_path: Path) -> None:
    recipe = _rag_recipe(tmp_path, k=1)
    checked = check_recipe(recipe)
    assert checked.spec.input_fields == ("passages", "question")
    out = tmp_path / "rendered"
    result = render(checked, out, base_model="base", validate_axolotl=False)
    assert result.index_dir == out / INDEX_DIR
    retriever = load_retriever(out / INDEX_DIR, k=1)
    assert len(retriever.passages) == 12  # every paragraph of the file, once
    gold = {r["question"]: r["context"] for r in squad_rows(json.loads(SQUAD.read_text()))}
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == len(checked.splits.train) == 8
    not_gold = 0
    for split_row, row in zip(checked.splits.train, rows, strict=True):
        question = split_row["question"]
        user = row["messages"][1]["content"]
        passage = retriever.search(question)[0]
        assert user == f"Passages:\n[1] {passage}\n\nQuestion: {question}"
        assert row["messages"][2]["content"] == split_row["answer"]
        if passage != gold[question]:
            not_gold += 1
            assert gold[question] not in user
    assert not_gold >= 1  # "What crosses the <river>?" retrieves another paragraph
    # The split files hold the data alone; the passages come from the retriever.
    assert "passages" not in read_jsonl(out / "splits" / "train.jsonl")[0]


def test_retrieve_problems_name_their_keys(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        check_recipe(_rag_recipe(tmp_path, extra={
            "retrieve.field": "question", "retrieve.query": "context",
            "retrieve.corpus": str(tmp_path / "missing.csv")}))
    paths = {p.path: p.message for p in info.value.problems}
    assert "already a field of the signature" in paths["retrieve.field"]
    assert "'context' is not an input field" in paths["retrieve.query"]
    assert "no such file" in paths["retrieve.corpus"]
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("body\nsome text\n")
    with pytest.raises(RecipeError, match="no column 'text' .*columns present: body"):
        check_recipe(_rag_recipe(tmp_path, extra={"retrieve.corpus": str(corpus),
                                                  "retrieve.format": "csv"}))
    with pytest.raises(RecipeError, match="retrieve.k: must be at least 1"):
        _rag_recipe(tmp_path, k=0)
    with pytest.raises(RecipeError, match=r"retrieve.kk: unknown key \(did you mean 'k'\?\)"):
        _rag_recipe(tmp_path, extra={"retrieve.kk": 2})


def test_the_rag_program_prompts_with_the_passages_it_retrieves(tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    import dspy

    from copa.dspy.kit import task_kit
    from copa.inference.engine import close_all, make_lm

    recipe = _rag_recipe(tmp_path, model=str(tiny_model_dir), k=2)
    checked = check_recipe(recipe)
    retriever = build_retriever([r["context"] for r in squad_rows(json.loads(
        SQUAD.read_text()))][::2], k=2)
    kit = task_kit(recipe, checked.splits.train, checked.splits.val, checked.spec,
                   retriever=retriever)
    # Train examples carry what the program would retrieve, so labeled demos are complete.
    example = kit.trainset[0]
    assert example.passages == retriever.search(example.question)
    assert set(example.inputs()) == {"question"}
    lm = make_lm(str(tiny_model_dir), "tiny", max_tokens=3)
    try:
        with dspy.context(lm=lm, adapter=kit.adapter):
            program = kit.program.deepcopy()
            assert program.retriever is retriever  # shared, never copied
            program.answer.demos = [kit.trainset[1]]
            question = checked.splits.test[0]["question"]
            prediction = program(question=question)
        assert isinstance(prediction.answer, str)
        messages = lm.history[-1]["messages"]
        passages = retriever.search(question)
        assert messages[-1]["content"] == (f"Passages:\n[1] {passages[0]}\n[2] {passages[1]}"
                                           f"\n\nQuestion: {question}")
        demo = kit.trainset[1]
        assert messages[-3]["content"].startswith(f"Passages:\n[1] {demo.passages[0]}\n")
        assert messages[-2]["content"] == demo.answer
    finally:
        close_all()


@pytest.mark.slow
def test_a_rag_run_reports_recall_at_k_and_generated_tokens(tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """render -> optimize -> evaluate on the tiny model (no fine-tuning): the index is built
    in the run directory, the program retrieves from it, the report adds recall@k."""
    import copa
    from copa.dspy.metrics import answer_found
    from copa.inference.engine import close_all

    overrides = {"data.splits": FIXTURE_SPLITS["squad_rag"], "retrieve.k": 1,
                 "model.base": str(tiny_model_dir), "finetune.enabled": False,
                 "optimize.params": {"max_bootstrapped_demos": 0, "max_labeled_demos": 1},
                 "optimize.num_threads": 4,
                 # the fixture's longest shortest accepted answer, 'Aurel Venn', is 5 tokens
                 "evaluate": {"metric": "squad_f1", "max_tokens": 5, "bootstrap": 50,
                              "num_threads": 4}}
    try:
        run = copa.run(REPO / "recipes" / "squad_rag.yaml", run_dir=tmp_path / "run",
                       overrides=overrides, emit=lambda _: None)
    finally:
        close_all()
    report = json.loads((run.dir / "report.json").read_text())
    assert list(report["arms"]) == ["baseline", "prompt_only"]
    retriever = load_retriever(run.rendered / INDEX_DIR, k=1)
    test_rows = read_jsonl(run.rendered / "splits" / "test.jsonl")
    hits = [answer_found(retriever.search(r["question"]), r["answers"]) for r in test_rows]
    assert 0 < sum(hits) < len(hits)  # the fixture has hits and misses at k = 1
    assert report["retrieval"] == {"retriever": "bm25", "k": 1, "passages": 12, "n": 6,
                                   "recall_at_k": sum(hits) / len(hits)}
    assert f"recall@1 {100 * sum(hits) / len(hits):.1f}" in (run.dir / "report.md").read_text()
    assert 6 <= report["eval_tokens"]["baseline"] <= 6 * 5  # 1 to 5 tokens per test question
    if report["prompt_optimization"]["prompt_only"]["winner"] == "plain":
        # the baseline's very prompts: answered from the response cache, nothing generated
        assert report["eval_tokens"]["prompt_only"] == 0
    assert "generated tokens/s" in (run.dir / "report.md").read_text()
    assert run.manifest.stage("render")["artifacts"]["retriever"] == str(run.rendered / INDEX_DIR)
