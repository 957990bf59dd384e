"""Template proof: training's token sequence is the model's own chat format, only answers are trained, and the
merged model is served the trained prompt.

For each preset family, on the tiny models' genuine tokenizers (Qwen3's own files and official chat
template; the Llama 3 BPE with Llama-3.2-3B-Instruct's special tokens and Llama 3.2's chat
template), a conversation is encoded the way training encodes it (LLaMA-Factory's tokenizer loader,
`get_template_and_fix_tokenizer` and the supervised processor) and compared token by token with
the tokenizer's own `apply_chat_template` for the same conversation and thinking setting.

Where the two differ by design, the difference is named and asserted exactly:

- LLAMA32_DATE_HEADER: Llama 3.2's template always opens with a system block holding
  "Cutting Knowledge Date: December 2023\\nToday Date: <today>\\n\\n" (even without a system
  prompt); LLaMA-Factory's llama3 template does not emit it.
- QWEN3_HISTORY_THINK: for an earlier assistant turn LLaMA-Factory's qwen3 template keeps the empty
  think block "<think>\\n\\n</think>\\n\\n" it adds to every turn; Qwen3's template drops think
  blocks from earlier turns. The last turn, the one being answered, is identical.
- QWEN3_NEWLINE_AFTER_EOS: LLaMA-Factory's qwen3 answer ends "<|im_end|>\\n", so the "\\n" after the
  end-of-turn token is a trained label too (harmless: generation stops at <|im_end|>).
"""

from __future__ import annotations

from functools import cache

import pytest
from conftest import lf_training_encoding as training_encoding

IGNORE_INDEX = -100
DATE = "26 Jul 2024"  # Llama 3.2's template prints today's date unless date_string is given
LLAMA32_DATE_HEADER = f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n"
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
SYSTEM = "You are a concise assistant."
Q1, A1 = "How do I run the demo?", "Run make demo."
Q2, A2 = "And the tests?", "Run make test."
SINGLE = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
MULTI = SINGLE + [{"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
REASONED = [{"role": "user", "content": Q1},
            {"role": "assistant", "content": "<think>\nThe Makefile has a demo target.\n</think>\n\n" + A1}]

# (family fixture, LLaMA-Factory template, enable_thinking)
CASES = {
    "qwen3-thinking-off": ("tiny_qwen3", "qwen3", False),
    "qwen3-thinking-on": ("tiny_qwen3", "qwen3", True),
    "llama3": ("tiny_llama3", "llama3", None),
}
CONVERSATIONS = {"single": (SINGLE, None), "system": (SINGLE, SYSTEM), "multi": (MULTI, None)}


@cache
def hf_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def model_rendering(model_dir, thinking: bool | None, conversation, system, add_generation_prompt=False):
    """The tokenizer's own chat template, as a server would apply it (special tokens as ids)."""
    tokenizer = hf_tokenizer(str(model_dir))
    messages = ([{"role": "system", "content": system}] if system else []) + list(conversation)
    kwargs = {"date_string": DATE}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt, **kwargs)["input_ids"]


def insertions(longer: list[int], shorter: list[int]) -> list[tuple[int, list[int]]]:
    """Every (position, span) with longer == shorter[:position] + span + shorter[position:]."""
    extra = len(longer) - len(shorter)
    assert extra > 0, "expected the first sequence to be the longer one"
    return [(pos, longer[pos:pos + extra]) for pos in range(len(shorter) + 1)
            if longer[:pos] == shorter[:pos] and longer[pos + extra:] == shorter[pos:]]


def assert_inserted(longer, shorter, tokenizer, text: str, after: str) -> None:
    """`longer` is `shorter` with exactly the tokens of `text` inserted right after the text `after`."""
    found = [(pos, span) for pos, span in insertions(longer, shorter)
             if tokenizer.decode(span) == text and tokenizer.decode(shorter[:pos]).endswith(after)]
    assert found, (
        f"expected exactly {text!r} inserted after {after!r}\n  longer:  {tokenizer.decode(longer)!r}\n"
        f"  shorter: {tokenizer.decode(shorter)!r}"
    )


def assert_same_except_named_differences(family: str, system, conversation, training, served, tokenizer) -> None:
    """Training's sequence equals the model's rendering, up to the named by-design differences only."""
    if family.startswith("llama3"):
        # LLAMA32_DATE_HEADER: inside the user's system block, or as a whole system block of its own.
        if system:
            assert_inserted(served, training, tokenizer, LLAMA32_DATE_HEADER,
                            after="<|start_header_id|>system<|end_header_id|>\n\n")
        else:
            assert_inserted(served, training, tokenizer,
                            "<|start_header_id|>system<|end_header_id|>\n\n" + LLAMA32_DATE_HEADER + "<|eot_id|>",
                            after="<|begin_of_text|>")
    elif len(conversation) > 2:
        # QWEN3_HISTORY_THINK: the earlier assistant turn keeps its empty think block in training.
        assert_inserted(training, served, tokenizer, QWEN3_EMPTY_THINK,
                        after=f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert training == served, (
            f"training:   {tokenizer.decode(training)!r}\nmodel's own: {tokenizer.decode(served)!r}")


def labelled_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert label == token, "a label must be the token at its own position"
            current.append(token)
    return spans + ([current] if current else [])


def expected_answer(template: str, thinking: bool | None, answer: str) -> str:
    """One assistant turn as training labels it: the answer and its end-of-turn token."""
    if template == "llama3":
        return answer + "<|eot_id|>"
    think = QWEN3_EMPTY_THINK if thinking and "<think>" not in answer else ""
    return think + answer + "<|im_end|>\n"  # QWEN3_NEWLINE_AFTER_EOS


@pytest.mark.parametrize("conversation_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_sequence_is_the_models_own_chat_format(request, case, conversation_name):
    fixture, template, thinking = CASES[case]
    model_dir = request.getfixturevalue(fixture)
    conversation, system = CONVERSATIONS[conversation_name]
    input_ids, _, tokenizer = training_encoding(model_dir, template, thinking, conversation, system)
    served = model_rendering(model_dir, thinking, conversation, system)
    assert_same_except_named_differences(case, system, conversation, input_ids, served, tokenizer)


@pytest.mark.parametrize("conversation_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_mask_every_prompt_token_and_keep_every_answer_token(request, case, conversation_name):
    fixture, template, thinking = CASES[case]
    model_dir = request.getfixturevalue(fixture)
    conversation, system = CONVERSATIONS[conversation_name]
    input_ids, labels, tokenizer = training_encoding(model_dir, template, thinking, conversation, system)
    answers = [turn["content"] for turn in conversation if turn["role"] == "assistant"]
    spans = labelled_spans(input_ids, labels)

    assert [tokenizer.decode(span) for span in spans] == [expected_answer(template, thinking, a) for a in answers]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|eot_id|>" if template == "llama3" else "<|im_end|>")
    for span in spans:  # the end-of-turn token itself is trained, as the last token (qwen3: before its "\n")
        assert span[-1 if template == "llama3" else -2] == end_of_turn
    # every other token (system, user turns, headers, and for thinking-off the empty think block) is masked
    assert sum(label != IGNORE_INDEX for label in labels) == sum(len(span) for span in spans)

    # The prompt of the last turn, the part that is masked before the last answer, is what a server
    # sends: the model's own template with add_generation_prompt and the same thinking setting.
    last_prompt = input_ids[: len(input_ids) - len(spans[-1])]
    served_prompt = model_rendering(model_dir, thinking, conversation[:-1], system, add_generation_prompt=True)
    assert_same_except_named_differences(case, system, conversation, last_prompt, served_prompt, tokenizer)


def test_qwen3_thinking_on_keeps_the_reasoning_of_the_answer(tiny_qwen3):
    """Data with reasoning trains with enable_thinking on: the think block is trained, as Qwen3 renders it."""
    input_ids, labels, tokenizer = training_encoding(tiny_qwen3, "qwen3", True, REASONED, None)
    assert input_ids == model_rendering(tiny_qwen3, True, REASONED, None)
    [span] = labelled_spans(input_ids, labels)
    assert tokenizer.decode(span) == REASONED[-1]["content"] + "<|im_end|>\n"


def test_qwen3_thinking_off_puts_the_empty_think_block_in_the_prompt(tiny_qwen3):
    """Thinking off: the served prompt ends with the empty think block, and training masks it the same way."""
    input_ids, labels, tokenizer = training_encoding(tiny_qwen3, "qwen3", False, SINGLE, None)
    served_prompt = model_rendering(tiny_qwen3, False, SINGLE[:1], None, add_generation_prompt=True)
    assert tokenizer.decode(served_prompt).endswith("<|im_start|>assistant\n" + QWEN3_EMPTY_THINK)
    assert input_ids[: len(served_prompt)] == served_prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(served_prompt)])


# ---------------------------------------------------------------- the served prompt is the trained one
# `llamafactory-cli export` keeps the base tokenizer's own template (the two differences above); the kit's merge
# writes LLaMA-Factory's template into the merged folder instead (sftkit.merge.served_template), and verify-merge
# names the first token where a merged folder's template and training's encoding part.

PRESETS = {"qwen3-thinking-off": CASES["qwen3-thinking-off"], "qwen3-thinking-on": CASES["qwen3-thinking-on"],
           "llama3.2-3b": CASES["llama3"]}
THIRD = [{"role": "user", "content": "And the linter?"}, {"role": "assistant", "content": "Run ruff check ."}]
SERVED_CONVERSATIONS = {"system-3-turns": (MULTI + THIRD, SYSTEM), "3-turns": (MULTI + THIRD, None),
                        "system-1-turn": (SINGLE, SYSTEM), "reasoned-history": (REASONED + MULTI[2:], SYSTEM)}


def exported(model_dir, template: str, thinking: bool | None, out):
    """The merged folder's tokenizer files as `llamafactory-cli export` writes them: LLaMA-Factory's tokenizer
    loader, the template's fixes (`get_template_and_fix_tokenizer`), `save_pretrained`."""
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer

    from sftkit.merge import served_template

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))["tokenizer"]
    served_template.lf_template(template, thinking, tokenizer)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged_tokenizer(request, tmp_path_factory):
    """merged_tokenizer(preset, kit): (base dir, merged tokenizer folder) once per preset: as the kit's merge leaves
    it (kit=True: sftkit.merge.served_template.write), or as the export leaves it with the thinking default the
    kit's merge used to add (kit=False: the model's own template)."""
    from sftkit.merge import export as merge

    made = {}

    def make(preset: str, kit: bool):
        if (preset, kit) not in made:
            fixture, template, thinking = PRESETS[preset]
            model_dir = request.getfixturevalue(fixture)
            folder = exported(model_dir, template, thinking, tmp_path_factory.mktemp("merged") / preset)
            if kit:
                assert merge.served_template.write(folder, template, thinking)  # what `python -m sftkit merge` does
            else:
                merge.record_thinking_default(folder, thinking)
            made[preset, kit] = model_dir, folder
        return made[preset, kit]
    return make


def served(folder, conversation, system, add_generation_prompt=False):
    """The folder's own template as a server applies it: no enable_thinking, no date passed (its defaults)."""
    tokenizer = hf_tokenizer(str(folder))
    messages = ([{"role": "system", "content": system}] if system else []) + list(conversation)
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


@pytest.mark.parametrize("conversation_name", sorted(SERVED_CONVERSATIONS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_template_the_merge_writes_gives_trainings_token_ids(merged_tokenizer, preset, conversation_name):
    _, template, thinking = PRESETS[preset]
    model_dir, folder = merged_tokenizer(preset, kit=True)
    conversation, system = SERVED_CONVERSATIONS[conversation_name]
    input_ids, labels, tokenizer = training_encoding(model_dir, template, thinking, conversation, system)

    whole = served(folder, conversation, system)
    assert whole == input_ids, f"\ntraining: {tokenizer.decode(input_ids)!r}\nserved:   {tokenizer.decode(whole)!r}"
    last_answer = labelled_spans(input_ids, labels)[-1]
    prompt = served(folder, conversation[:-1], system, add_generation_prompt=True)  # what a server feeds
    assert prompt == input_ids[: len(input_ids) - len(last_answer)], tokenizer.decode(prompt)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_verify_merge_passes_the_template_the_merge_writes(merged_tokenizer, preset):
    from sftkit.merge import verify_merge

    _, template, thinking = PRESETS[preset]
    model_dir, folder = merged_tokenizer(preset, kit=True)
    report = served_check(model_dir, folder, template, thinking)
    assert report["served_prompt_ok"] is True and report["problems"] == []
    assert "gives training's token ids" in "\n".join(verify_merge.summary(report))


def served_check(model_dir, folder, template, thinking) -> dict:
    """verify-merge's served-prompt check alone, with the run's template and thinking setting."""
    from sftkit.merge import served_template, verify_merge

    report = verify_merge.Report(model_dir, model_dir, folder)
    report["template"], report["enable_thinking"] = template, thinking
    served_template.check(hf_tokenizer(str(model_dir)), folder, report)
    return verify_merge.finish(report)


# The official templates, as `llamafactory-cli export` leaves them (and, for Qwen3, with the thinking default the
# kit's merge used to add): measured first differences on the 3-turn conversation with a system prompt.
OFFICIAL_FIRST_DIFFERENCE = {
    "llama3.2-3b": (5, (38766, "Cut"), (2675, "You")),  # "Cutting Knowledge Date" opens the system block
    "qwen3-thinking-off": (26, (6727, "Run"), (151667, "<think>")),  # the earlier answer lost its empty think
    "qwen3-thinking-on": (26, (6727, "Run"), (151667, "<think>")),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_verify_merge_names_the_first_token_where_the_official_template_differs(merged_tokenizer, preset):
    from sftkit.merge import verify_merge

    _, template, thinking = PRESETS[preset]
    model_dir, folder = merged_tokenizer(preset, kit=False)
    report = served_check(model_dir, folder, template, thinking)

    position, (merged_id, merged_text), (trained_id, trained_text) = OFFICIAL_FIRST_DIFFERENCE[preset]
    assert report["ok"] is False and report["served_prompt_ok"] is False
    [problem] = report["problems"]
    assert problem["name"] == "served-prompt-mismatch" and problem["kind"] == "defect"
    assert report["served_prompt"]["first_difference"] == {
        "position": position, "merged": {"id": merged_id, "text": merged_text},
        "training": {"id": trained_id, "text": trained_text}, "of": "generation prompt",
        "after": report["served_prompt"]["first_difference"]["after"]}
    assert (f"differs at token {position}" in problem["message"]
            and f"merged template id {merged_id} {merged_text!r}, training id {trained_id} {trained_text!r}"
            in problem["message"] and "python -m sftkit merge" in problem["message"])
    assert f"served prompt: DIFFERS from training's at token {position}" in "\n".join(verify_merge.summary(report))
