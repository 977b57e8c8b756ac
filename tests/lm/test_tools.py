"""Multi-turn rollouts with tools (opd.lm.rollouts.tools): the calculator, the masks of a conversation, where the
gradient goes, what the teacher sees, and the one-line failures."""

import types

import pytest
import torch

from opd.config import DistillConfig
from opd.lm.batch import layout
from opd.lm.rollouts.tools import (Conversation, ToolActor, ToolChat, ToolFailed, ToolUse, calculator,
                                   conversation_batch, load_tool)
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import student_loss
from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(get_task("arithmetic-tools"))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def scripted(tok, scripts: dict[str, list[str]], logp_of=None):
    """A `sample_turn` that writes each prompt's scripted turns in order (ending each with eos), whatever the model."""
    prompts = {tuple(ids(tok, p)): turns for p, turns in scripts.items()}

    def sample_turn(seqs, turn):
        out = []
        for seq in seqs:
            prompt = next(p for p in prompts if tuple(seq[:len(p)]) == p)
            out.append(ids(tok, prompts[prompt][turn]) + [tok.eos_token_id])
        return out, None if logp_of is None else [[logp_of] * len(c) for c in out]

    return sample_turn


def tool_use(tok, tool=calculator, max_turns=5, max_new_tokens=16, context=128):
    return ToolUse(tool, "calc", ToolChat(tok), max_turns, max_new_tokens, context, tok.eos_token_id)


def test_the_calculator_evaluates_the_last_call_and_reports_bad_ones_as_errors():
    assert calculator("calc(7+6+0)") == "13"
    assert calculator("first calc(1+1) then calc(2*(3+4))") == "14"
    assert calculator("calc(7/2)") == "3.5"
    assert calculator("ans=46") is None
    assert calculator("calc(1/0)").startswith("error")
    assert calculator("calc(__import__('os'))").startswith("error")  # names are not arithmetic
    assert calculator("calc(9**9**9)").startswith("error")  # would run for minutes
    assert load_tool("calc") is calculator


def test_a_conversation_masks_exactly_the_models_own_tokens(tok):
    """Against a hand-built conversation: two prompts, one with two tool calls, one that answers at once."""
    eos = tok.eos_token_id
    script = {"12+34=": ["calc(2+4+0)", " calc(1+3+0)", " ans=46"], "5+5=": ["ans=10"]}
    prompts = [ids(tok, p) for p in script]
    talks = tool_use(tok).converse(scripted(tok, script), prompts)
    # by hand: (tokens, own) pieces in order
    pieces = [[(ids(tok, "calc(2+4+0)") + [eos], True), (ids(tok, "6"), False),
               (ids(tok, " calc(1+3+0)") + [eos], True), (ids(tok, "4"), False), (ids(tok, " ans=46") + [eos], True)],
              [(ids(tok, "ans=10") + [eos], True)]]
    for talk, row in zip(talks, pieces):
        assert talk.tokens == [t for part, _ in row for t in part]
        assert talk.own == [own for part, own in row for _ in part]
    assert (talks[0].turns, talks[0].calls, talks[1].turns, talks[1].calls) == (3, 2, 1, 0)
    batch = conversation_batch(prompts, talks, tok.pad_token_id)
    for b, (prompt, row) in enumerate(zip(prompts, pieces)):
        P = batch.input_ids_BL.shape[1] - sum(len(part) for part, _ in pieces[0])  # the padded prompt width
        tokens = [t for part, _ in row for t in part]
        assert batch.input_ids_BL[b, P - len(prompt):P + len(tokens)].tolist() == prompt + tokens
        own_targets = [P - 1 + j for j, own in enumerate(o for part, o in row for _ in part) if own]
        assert batch.mask_BT[b].nonzero().flatten().tolist() == own_targets
    assert batch.completion_ids()[0] == [t for part, own in pieces[0] for t in part if own]
    assert batch.rollout_metrics == {"turns": 2.0, "tool_calls": 1.0, "tool_call_errors": 0.0}


def test_no_gradient_reaches_a_tool_answer_and_every_own_token_gets_one(tok):
    script = {"12+34=": ["calc(2+4+0)", " calc(1+3+0)", " ans=46"], "98+7=": ["calc(8+7+0)", " ans=105"]}
    prompts = [ids(tok, p) for p in script]
    talks = tool_use(tok).converse(scripted(tok, script), prompts)
    batch = conversation_batch(prompts, talks, tok.pad_token_id)
    student, teacher = tiny_llama(tok, 16, 1, 0), tiny_llama(tok, 16, 1, 1)
    kept = {}

    def keep(module, args, out):
        out.retain_grad()
        kept["h"] = out

    student.model.norm.register_forward_hook(keep)
    signal = LocalTeacher(teacher).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    loss, _ = student_loss(student, batch, signal, DistillConfig(student="unused", loss="reverse_kl"))
    loss.backward()
    # the final hidden state at position t feeds only the prediction of token t + 1
    grad_BT = kept["h"].grad[:, :-1].abs().sum(-1)
    P = max(len(p) for p in prompts)  # the padded prompt width: conversation token j is target P - 1 + j
    for b, talk in enumerate(talks):
        tool_targets = [P - 1 + j for j, own in enumerate(talk.own) if not own]
        own_targets = [P - 1 + j for j, own in enumerate(talk.own) if own]
        assert len(tool_targets) > 0 and grad_BT[b, tool_targets].max() == 0  # tool answers: no gradient
        assert (grad_BT[b, own_targets] > 0).all()
    assert grad_BT[:, :P - 1].max() == 0  # nor the prompts


def test_the_teacher_grades_each_own_token_given_the_whole_conversation_so_far(tok):
    script = {"12+34=": ["calc(2+4+0)", " ans=46"], "5+5=": ["ans=10"]}
    prompts = [ids(tok, p) for p in script]
    talks = tool_use(tok).converse(scripted(tok, script), prompts)
    batch = conversation_batch(prompts, talks, tok.pad_token_id)
    teacher = tiny_llama(tok, 16, 2, 3).eval()
    signal = LocalTeacher(teacher).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    head = teacher.get_output_embeddings()
    # row 0 alone, unpadded: prompt + turn + tool answer + turn
    seq = torch.tensor([prompts[0] + talks[0].tokens])
    with torch.no_grad():
        alone = teacher(seq).logits[0, :-1].log_softmax(-1)
        graded = head(signal.hidden_BTD[0][batch.mask_BT[0].bool()]).log_softmax(-1)
    own_targets = [len(prompts[0]) - 1 + j for j, own in enumerate(talks[0].own) if own]
    torch.testing.assert_close(graded, alone[own_targets], atol=1e-5, rtol=1e-5)


def test_the_tool_actor_keeps_the_samplers_log_probs_of_own_tokens_only(tok):
    script = {"12+34=": ["calc(2+4+0)", " ans=46"]}
    prompts = types.SimpleNamespace(prompt_ids=[ids(tok, "12+34=")])
    turn = scripted(tok, script, logp_of=-0.5)

    class Inner:
        source = "student"

        def sample(self, prompt_ids, seed):
            self.seeds = getattr(self, "seeds", []) + [seed]
            completions, logps = turn(prompt_ids, len(self.seeds) - 1)
            batch = layout(prompt_ids, completions, tok.pad_token_id, logps)
            batch.sampled_by = 7
            return batch

    inner = Inner()
    batch = ToolActor(inner, tool_use(tok), prompts, tok.pad_token_id).rollouts(
        types.SimpleNamespace(rows=[0], seed=100))
    mask = batch.mask_BT.bool()
    assert (batch.sampling_logp_BT[mask] == -0.5).all() and (batch.sampling_logp_BT[~mask] == 0).all()
    assert int(mask.sum()) == len(ids(tok, "calc(2+4+0)")) + len(ids(tok, " ans=46")) + 2
    assert inner.seeds[0] == 100 and inner.seeds[1] != 100  # each turn its own seeds
    assert batch.sampled_by == 7


def test_the_chat_template_writes_the_answer_as_a_tool_message_and_the_next_turns_header():
    tok = build_tokenizer(types.SimpleNamespace(alphabet="0123456789+=() abcdefghijklmnopqrstuvwxyz"))
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }} {{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<bos>assistant {% endif %}")
    # the model's turn ended with <eos> already: what follows is the tool message and the assistant header
    assert ToolChat(tok).answer_ids("13") == ids(tok, "<bos>tool 13<eos><bos>assistant ")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                         "{% endif %}<bos>{{ m['role'] }} {{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<bos>assistant {% endif %}")
    with pytest.warns(UserWarning, match="no tool role"):
        assert ToolChat(tok).answer_ids("13") == ids(tok, "<bos>user 13<eos><bos>assistant ")


@pytest.mark.parametrize("tool, message", [
    (lambda turn: 1 / 0, "the tool calc raised ZeroDivisionError: division by zero on row 4, turn 1"),
    (lambda turn: 13, "the tool calc answered a int on row 4, turn 1"),
])
def test_a_tool_that_raises_or_answers_no_text_stops_in_one_line_naming_the_row(tok, tool, message):
    script = {"12+34=": ["calc(2+4+0)", " ans=46"]}
    with pytest.raises(ToolFailed, match=message.replace("(", r"\(")) as e:
        tool_use(tok, tool=tool).converse(scripted(tok, script), [ids(tok, "12+34=")], rows=[4])
    assert "\n" not in str(e.value)


def test_a_conversation_that_would_outgrow_the_context_stops_in_one_line(tok):
    script = {"12+34=": ["calc(2+4+0)", " calc(1+3+0)", " ans=46"]}
    with pytest.raises(ToolFailed, match=r"row 0: after turn 1 .* pass the model's context of 30; lower --max-turns"):
        tool_use(tok, context=30).converse(scripted(tok, script), [ids(tok, "12+34=")])


def test_turns_end_at_max_turns_and_at_a_turn_cut_short(tok):
    script = {"12+34=": ["calc(2+4+0)", " calc(1+3+0)", " ans=46"]}
    talk, = tool_use(tok, max_turns=2).converse(scripted(tok, script), [ids(tok, "12+34=")])
    assert (talk.turns, talk.calls) == (2, 1)  # the second turn's call is not answered: no turn would follow

    def cut(seqs, turn):  # no eos: --sampling.max-new-tokens ran out
        return [ids(tok, "calc(2+4")] * len(seqs), None

    talk, = tool_use(tok).converse(cut, [ids(tok, "12+34=")])
    assert (talk.turns, talk.calls) == (1, 0)


@pytest.mark.parametrize("flags, refusal", [
    (dict(source="data", loss="sft"), "--tools: source=data has nobody to talk to the tool"),
    (dict(teacher="t", source="speculative"), "--tools: source=speculative"),
    (dict(teacher="t", overlap=True), "--tools: --overlap's sampler process"),
    (dict(teacher="t", cross_tokenizer=True), "--tools: --cross-tokenizer"),
])
def test_what_cannot_hold_a_conversation_is_refused_when_the_config_is_built(flags, refusal):
    with pytest.raises(ValueError, match=refusal.replace("(", r"\(")):
        DistillConfig(student="s", tools="calc", **flags)


def test_conversation_logps_drop_to_none_when_a_turn_has_none():
    c = Conversation()
    c.add([1, 2], own=True, logps=[-1.0, -2.0])
    c.add([3], own=False)
    assert c.logps == [-1.0, -2.0]
    c.add([4], own=True, logps=None)
    assert c.logps is None and c.own == [True, True, False, True]
