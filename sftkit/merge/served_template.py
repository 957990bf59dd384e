"""The merged model's chat template is the trained prompt: LLaMA-Factory's template written as jinja, and its check.

`llamafactory-cli export` keeps the base tokenizer's own chat template (LLaMA-Factory's `qwen3` and `llama3`
templates do not replace it), but training encoded every turn with LLaMA-Factory's template, and they differ
(measured on the genuine tokenizers, a 3-turn conversation with a system prompt):

- llama3: Llama 3.2's template opens the system block with "Cutting Knowledge Date: December 2023 / Today
  Date: <today>"; training did not (first difference at token 5);
- qwen3, thinking off and on: training keeps the empty "<think>\\n\\n</think>\\n\\n" block in every earlier
  assistant turn; Qwen3's template drops it from history (first difference at the first earlier answer).

`write` (called by `python -m sftkit merge`) puts the training template into the merged folder, with the run's
thinking setting as its default; `check` (verify-merge) renders the test conversation with the merged folder's
template and with LLaMA-Factory's encoding, and names the first differing token.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sftkit.merge.chat import FIXED_DATE, first_line

THINKING_MARK = "sftkit: trained with enable_thinking="
TRAINED_MARK = "sftkit: LLaMA-Factory's template"
TEST_SYSTEM = "You are a concise assistant."
TEST_CONVERSATION = [
    {"role": "user", "content": "How do I run the demo?"}, {"role": "assistant", "content": "Run make demo."},
    {"role": "user", "content": "And the tests?"}, {"role": "assistant", "content": "Run make test."},
    {"role": "user", "content": "And the linter?"}, {"role": "assistant", "content": "Run ruff check ."},
]
FIX = ("merge with `python -m sftkit merge` (it writes the training template into the merged folder), or serve "
       "with a chat template that renders LLaMA-Factory's")


def thinking_header(thinking: bool) -> str:
    """Jinja lines making `thinking` the template's default (a request may still pass enable_thinking)."""
    value = str(bool(thinking)).lower()
    return (f"{{#- {THINKING_MARK}{value}; requests that do not pass enable_thinking get the same #}}\n"
            f"{{%- if enable_thinking is not defined %}}{{%- set enable_thinking = {value} %}}{{%- endif %}}\n")


def lf_template(name: str, thinking: bool | None, tokenizer):
    """LLaMA-Factory's template as training set it up (`get_template_and_fix_tokenizer`, which edits `tokenizer`)."""
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    args = DataArguments(template=name, **({} if thinking is None else {"enable_thinking": thinking}))
    return get_template_and_fix_tokenizer(tokenizer, args)


def _lit(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _slots(slots: list, tokenizer, placeholder: str) -> str:
    """A formatter's slots as one jinja expression: text around `{{content}}` as literals, the placeholder for
    the content, the tokenizer's own BOS/EOS text for `{"bos_token"}`/`{"eos_token"}`; ValueError for a token-id
    slot (a dict), which a chat template cannot write."""
    items = []
    for slot in slots:
        if isinstance(slot, str):
            head, *tail = slot.split("{{content}}", 1)
            items += ([_lit(head)] if head else []) + ([placeholder] if tail else []) + (
                [_lit(tail[0])] if tail and tail[0] else [])
        elif isinstance(slot, set):
            for name in ("bos_token", "eos_token"):
                if name in slot and getattr(tokenizer, f"{name}_id") is not None:
                    items.append(_lit(getattr(tokenizer, name)))
                    break
        else:
            raise ValueError(f"slot {slot!r} is not text")
    return " + ".join(items)


def training_jinja(name: str, thinking: bool | None, tokenizer, official: str | None = None) -> str | None:
    """LLaMA-Factory's `name` template as a chat template that gives training's token ids (what its own
    `_get_jinja_template` writes, built from the template's public formatters, plus the empty-think handling of
    its reasoning templates and a non-empty system check); None for a template it cannot be written for. Tool
    calls and tool results fall back to `official`."""
    from llamafactory.data.formatter import EmptyFormatter, StringFormatter
    from llamafactory.data.template import ReasoningTemplate, Template

    spec = lf_template(name, thinking, tokenizer)
    if type(spec) not in (Template, ReasoningTemplate) or any(
            type(getattr(spec, f"format_{part}")) not in (StringFormatter, EmptyFormatter)
            for part in ("prefix", "system", "user", "assistant")):
        return None
    try:
        slot = {part: _slots(getattr(spec, f"format_{part}").apply(), tokenizer,
                             "system_message" if part == "system" else "content")
                for part in ("prefix", "system", "user", "assistant")}
    except ValueError:
        return None
    off = "enable_thinking is defined and enable_thinking is false"
    lines = [f"{{#- {TRAINED_MARK} {name!r}, as training formatted every turn (python -m sftkit merge) #}}"]
    if official:
        lines += [
            "{%- set sftkit = namespace(tools=(tools is defined and tools)) %}",
            "{%- for message in messages %}{%- if message['role'] not in ['system', 'user', 'assistant'] or "
            "(message.tool_calls is defined and message.tool_calls) %}{%- set sftkit.tools = true %}{%- endif %}"
            "{%- endfor %}",
            "{%- if sftkit.tools %}{#- tools: the model's own template (the kit writes no tool format) #}",
            official.strip(),
            "{%- else %}",
        ]
    if slot["prefix"]:
        lines.append("{{- " + slot["prefix"] + " }}")
    if spec.default_system:
        lines.append("{%- set system_message = " + _lit(spec.default_system) + " %}")
    lines += [
        "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
        "{%- set system_message = messages[0]['content'] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}",
        "{%- if system_message is defined and system_message %}{{- " + slot["system"] + " }}{%- endif %}",
        "{%- for message in loop_messages %}{%- set content = message['content'] %}",
        "{%- if message['role'] == 'user' %}{{- " + slot["user"] + " }}",
    ]
    if isinstance(spec, ReasoningTemplate):
        start, end = (word.strip() for word in spec.thought_words)
        empty = _lit(spec.add_thought())
        lines += [
            f"{{%- if {off} %}}{{{{- {empty} }}}}{{%- endif %}}",  # thinking off: the empty block is prompt
            "{%- elif message['role'] == 'assistant' %}",
            f"{{%- if {off} %}}{{%- if {_lit(end)} in content %}}"
            f"{{%- set content = content.split({_lit(end)})[-1].lstrip('\\n') %}}{{%- endif %}}",
            "{%- else %}{%- if message.reasoning_content is defined and message.reasoning_content and "
            f"{_lit(start)} not in content %}}{{%- set content = {_lit(spec.thought_words[0])} + "
            f"message.reasoning_content.strip('\\n') + {_lit(spec.thought_words[1])} + content.lstrip('\\n') %}}"
            "{%- endif %}",
            f"{{%- if {_lit(start)} not in content and {_lit(end)} not in content %}}"
            f"{{%- set content = {empty} + content %}}{{%- endif %}}{{%- endif %}}",
        ]
    else:
        lines.append("{%- elif message['role'] == 'assistant' %}")
    lines += ["{{- " + slot["assistant"] + " }}", "{%- endif %}{%- endfor %}"]
    if official:
        lines.append("{%- endif %}")
    text = "\n".join(lines) + "\n"
    return thinking_header(thinking) + text if isinstance(spec, ReasoningTemplate) and thinking is not None else text


def current_template(model_dir: Path) -> str | None:
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = Path(model_dir) / "tokenizer_config.json"
    if config_path.is_file():
        value = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def write(model_dir: Path, name: str | None, thinking: bool | None) -> bool:
    """Write LLaMA-Factory's `name` template (training's format) as the folder's chat template; False when it cannot
    be written (then the folder keeps its template and verify-merge says whether it gives training's prompt)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not name:
        return False
    official = current_template(model_dir)
    if official and TRAINED_MARK in official:
        return True
    text = training_jinja(name, thinking, AutoTokenizer.from_pretrained(str(model_dir)), official)
    if text is None:
        return False
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if isinstance(config.get("chat_template"), str):  # one template per folder: transformers prefers the .jinja
        del config["chat_template"]
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (model_dir / "chat_template.jinja").write_text(text, encoding="utf-8")
    return True


def training_ids(name: str, thinking: bool | None, base_tokenizer, system: str, conversation: list[dict]):
    """(generation prompt of the last turn, whole conversation) as LLaMA-Factory's training encodes them."""
    tokenizer = copy.deepcopy(base_tokenizer)  # get_template_and_fix_tokenizer edits it
    pairs = lf_template(name, thinking, tokenizer).encode_multiturn(tokenizer, conversation, system, None)
    whole = [token for prompt, answer in pairs for token in prompt + answer]
    return whole[: len(whole) - len(pairs[-1][1])], whole


def served_ids(tokenizer, thinking: bool | None, system: str, conversation: list[dict]):
    """(generation prompt, whole conversation) as a server renders them with the folder's own template."""
    kwargs = {"date_string": FIXED_DATE, **({} if thinking is None else {"enable_thinking": thinking})}
    messages = [{"role": "system", "content": system}, *conversation]

    def ids(chat, prompt):
        return tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=True,
                                             **kwargs)["input_ids"]
    return ids(messages[:-1], True), ids(messages, False)


def first_difference(served: list[int], trained: list[int], tokenizer) -> dict | None:
    """Where two id sequences first differ: position, both ids, their text, and the text before."""
    if served == trained:
        return None
    at = next((i for i, (a, b) in enumerate(zip(served, trained, strict=False)) if a != b),
              min(len(served), len(trained)))

    def token(ids):
        return {"id": ids[at], "text": tokenizer.decode(ids[at:at + 1])} if at < len(ids) else None
    return {"position": at, "merged": token(served), "training": token(trained),
            "after": tokenizer.decode(trained[max(0, at - 8):at])}


def check(base_tokenizer, merged: Path, report, merged_tokenizer=None) -> None:
    """verify-merge: the merged template gives training's token ids for TEST_CONVERSATION (prompt and whole).

    `merged_tokenizer`: the merged folder's, when the caller loaded it already (else it is loaded here)."""
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoTokenizer

    name, thinking = report["template"], report["enable_thinking"]
    if name is None or name not in TEMPLATES:
        return  # the EOS check names an unknown template
    try:
        tokenizer = merged_tokenizer or AutoTokenizer.from_pretrained(str(merged))
        if not tokenizer.chat_template:
            return  # the EOS check names a missing template
        served = served_ids(tokenizer, thinking, TEST_SYSTEM, TEST_CONVERSATION)
        trained = training_ids(name, thinking, base_tokenizer, TEST_SYSTEM, TEST_CONVERSATION)
    except Exception as err:  # noqa: BLE001 - a template that cannot render is the finding
        report["served_prompt_ok"] = False
        report.problem("served-prompt-mismatch", f"{merged}: its chat template does not render the test conversation "
                       f"({type(err).__name__}: {first_line(err)}); {FIX}")
        return
    report["served_prompt"] = {"prompt_tokens": len(trained[0]), "conversation_tokens": len(trained[1])}
    for what, mine, theirs in zip(("generation prompt", "whole conversation"), served, trained, strict=True):
        diff = first_difference(mine, theirs, tokenizer)
        if diff is None:
            continue
        report["served_prompt"].update(first_difference=dict(diff, of=what))
        report["served_prompt_ok"] = False
        side = {key: "end" if diff[key] is None else f"id {diff[key]['id']} {diff[key]['text']!r}"
                for key in ("merged", "training")}
        report.problem(
            "served-prompt-mismatch",
            f"{merged}: its chat template does not give the prompt training used (template {name}"
            + ("" if thinking is None else f", enable_thinking {str(thinking).lower()}")
            + f"): on a {len(TEST_CONVERSATION) // 2}-turn conversation with a system prompt, the {what} first "
            f"differs at token {diff['position']} (after {diff['after']!r}): merged template {side['merged']}, "
            f"training {side['training']}; the served model would get prompts it never saw in training: {FIX}",
        )
        return
    report["served_prompt_ok"] = True


def summary_line(report: dict) -> list[str]:
    """verify-merge's line for this check."""
    found = report.get("served_prompt")
    if not found:
        return []
    if report.get("served_prompt_ok"):
        return [f"  served prompt: the merged chat template gives training's token ids ({found['prompt_tokens']}-token "
                f"generation prompt, {found['conversation_tokens']}-token conversation)"]
    diff = found["first_difference"]
    return [f"  served prompt: DIFFERS from training's at token {diff['position']} of the {diff['of']}"]
