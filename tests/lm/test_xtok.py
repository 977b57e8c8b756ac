"""Cross-tokenizer distillation (`opd.lm.xtok.teacher`): alignment, events, the loss's exact parts, the teacher's template."""

import json
import math
from pathlib import Path

import pytest
import torch

from opd import losses
from opd.config import DistillConfig, SamplingArgs
from opd.lm.data.prompts import as_rows, encode, task_rows
from opd.lm.hf.model import final_hidden, lm_head
from opd.lm.batch import build_batch
from opd.lm.rollouts.local import sample
from opd.lm.teachers.local import LocalTeacher
from opd.lm.train import distill, teacher_divergence
from opd.lm.xtok.teacher import CrossTokenizerTeacher
from opd.lm.xtok.align import OTHER, align_spans, char_ends, retokenize, vocabulary_events
from opd.tasks.bpe import build_bpe_tokenizer
from opd.tasks import get_task
from opd.tasks.tokenizer import build_tokenizer
from opd.xtok_losses import binary_logp, event_logp, log1mexp
from tests.conftest import tiny_llama
from tests.lm.xtok_helpers import byte_bpe, char_tokenizer, chat_tokenizers

TRICKY = ["héllo wörld", "日本語のテキスト", "a🙂b 🙂🙂 c", "naïve café — “quoted”", "x\ty\nz", "ǅ ﬁ ẞ"]
"""Multi-byte characters (2, 3 and 4 bytes in UTF-8), ligatures and whitespace."""


@pytest.fixture(scope="module")
def pair():
    task = get_task("arithmetic")
    return build_tokenizer(task), build_bpe_tokenizer(task)


def _check_spans(student_tok, s_ids, teacher_tok, t_ids, text):
    spans = align_spans(char_ends(student_tok, s_ids, text, "student"), char_ends(teacher_tok, t_ids, text, "teacher"),
                        len(text))
    pieces = []
    for s0, s1, t0, t1 in spans:
        s_text = student_tok.decode(s_ids[s0:s1], clean_up_tokenization_spaces=False)
        t_text = teacher_tok.decode(t_ids[t0:t1], clean_up_tokenization_spaces=False)
        assert s_text == t_text, (s_text, t_text)  # both sides of a span spell the same text, whole characters
        pieces.append(s_text)
    assert "".join(pieces) == text
    assert [s[0] for s in spans] == [0] + [s[1] for s in spans[:-1]]  # contiguous, covering every token
    assert spans[-1][1] == len(s_ids) and spans[-1][3] == len(t_ids)
    return spans, pieces


@pytest.mark.parametrize("text", TRICKY)
def test_alignment_of_byte_level_and_character_tokens_never_cuts_a_character(text):
    student = byte_bpe(TRICKY)
    teacher = char_tokenizer("".join(TRICKY))
    s_ids = student(text, add_special_tokens=False)["input_ids"]
    spans, pieces = _check_spans(student, s_ids, teacher, retokenize(teacher, text), text)
    # minimal spans: every character ends a teacher token, so no student token may end on a whole character inside
    # a span (that offset would be a common boundary)
    for (s0, s1, _, _), piece in zip(spans, pieces):
        for k in range(s0 + 1, s1):
            partial = student.decode(s_ids[s0:k])
            assert not piece.startswith(partial) or "\ufffd" in partial, (piece, partial)


def test_a_multi_byte_character_split_over_byte_tokens_is_one_span():
    student, teacher = byte_bpe(["plain ascii text only"], vocab_size=270), char_tokenizer("a🙂b")
    s_ids = student("a🙂b", add_special_tokens=False)["input_ids"]
    assert len(s_ids) >= 4  # the emoji's four bytes are separate tokens
    _, pieces = _check_spans(student, s_ids, teacher, retokenize(teacher, "a🙂b"), "a🙂b")
    assert pieces == ["a", "🙂", "b"]


def test_merges_crossing_character_boundaries_align_into_the_shortest_common_spans(pair):
    char, bpe = pair
    text = "4+8+0=12 3+4+1=08 ans=812"
    s_ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert len(s_ids) < len(text)  # merges happened
    spans, pieces = _check_spans(bpe, s_ids, char, retokenize(char, text), text)
    # with a character-level side, every span is exactly one student token
    assert all(s1 - s0 == 1 for s0, s1, _, _ in spans)
    assert pieces == bpe.convert_ids_to_tokens(s_ids)
    # two BPE tokenizations of the same text that split it differently: spans end where both do
    other = ["4+8", "+0=", "12 3", "+4+1=08", " ans=812"]
    a = [bpe.convert_tokens_to_ids(t) for t in bpe.convert_ids_to_tokens(s_ids)]
    assert _check_spans(bpe, a, bpe, s_ids, text)[1] == pieces  # identical tokenizations: token by token
    b_tok = char_tokenizer(text)
    b_ids = [i for piece in other for i in retokenize(b_tok, piece)]
    assert "".join(other) == text
    _check_spans(bpe, s_ids, b_tok, b_ids, text)


def test_text_a_tokenizer_cannot_round_trip_is_refused_in_one_line(pair):
    char, _ = pair
    with pytest.raises(ValueError, match="cannot round-trip") as e:
        retokenize(char, "12+x=3")  # 'x' is not in the character vocabulary: <unk>
    assert "\n" not in str(e.value)


def test_tokens_that_do_not_decode_to_the_text_are_refused_in_one_line(pair):
    char, _ = pair
    with pytest.raises(ValueError, match="cannot align by text") as e:
        char_ends(char, char("12+3", add_special_tokens=False)["input_ids"], "12+4", "student")
    assert "\n" not in str(e.value)


def test_events_of_a_character_level_and_a_bpe_vocabulary_are_next_characters(pair):
    char, bpe = pair
    ev = vocabulary_events(bpe, char, len(bpe), len(char))
    for i in range(4, len(bpe)):  # every BPE token falls in the event of its first character
        first = bpe.convert_ids_to_tokens(i)[0]
        assert ev.names[ev.student_V[i]] == first
        assert ev.names[ev.teacher_V[char.convert_tokens_to_ids(first)]] == first
    assert ev.student_V[bpe.eos_token_id] == ev.teacher_V[char.eos_token_id] != OTHER


def test_event_logp_is_the_exact_log_of_summed_probabilities():
    logp = torch.log_softmax(torch.tensor([[5.0, -90.0, 2.0, -200.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]), -1)
    event = torch.tensor([1, 2, 1, 2, 3])  # event 0 has no member
    out = event_logp(logp.double(), event, 4)
    p = logp.double().exp()
    zero = torch.zeros(2, dtype=torch.float64)
    want = torch.stack([zero, p[:, [0, 2]].sum(1), p[:, [1, 3]].sum(1), p[:, 4]], 1).log()
    assert torch.isneginf(out[:, 0]).all()
    torch.testing.assert_close(out[:, 1:], want[:, 1:], rtol=1e-12, atol=0)
    # float32: members far below float32's smallest exp (e^-150, e^-300) keep their mass in log space
    tiny = event_logp(torch.tensor([[0.0, -150.0, -300.0]]), torch.tensor([1, 2, 2]), 3)
    assert tiny[0, 2].item() == pytest.approx(-150.0, abs=1e-5)


def test_log1mexp_and_binary_logp():
    x = torch.tensor([-1e-5, -0.5, -3.0, -50.0], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in (-1e-5, -0.5, -3.0)] + [-math.exp(-50.0)]  # log(1 - ε) = -ε there
    torch.testing.assert_close(log1mexp(x), torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
    two = binary_logp(torch.tensor([-0.1, 0.0]))
    torch.testing.assert_close(two.exp().sum(-1), torch.ones(2))
    assert torch.isfinite(two).all()  # a span of probability 1 is capped just below it


def _models_and_batch(student_tok, teacher_tok, n=6, new=24, seed=0):
    task = get_task("arithmetic")
    teacher, student = tiny_llama(teacher_tok, 32, 2, 1), tiny_llama(student_tok, 16, 1, 2)
    prompts = encode(student_tok, task_rows(task, n, "train"), 100)
    torch.manual_seed(seed)
    batch = sample(student, prompts.prompt_ids, student_tok.pad_token_id, student_tok.eos_token_id, new)
    return teacher, student, prompts, batch


def _student_side(student, batch):
    m = batch.mask_BT.bool()
    return final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][m], lm_head(student), \
        batch.targets_BT[m], m


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd", "tvd"])
def test_identical_tokenizers_give_the_same_tokenizer_loss(pair, name):
    char, _ = pair
    teacher, student, prompts, batch = _models_and_batch(char, char)
    divergence = losses.get_divergence(name, **({"beta": 0.3} if name == "jsd" else {}))
    hidden, head, targets, m = _student_side(student, batch)
    xt = CrossTokenizerTeacher(teacher, char, char, prompts, len(char))
    ours = xt.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT).per_token(
        divergence, hidden, head, targets, None)
    same = teacher_divergence(divergence, hidden, head, LocalTeacher(teacher).score(
        batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT), m, None)
    torch.testing.assert_close(ours, same, rtol=1e-5, atol=1e-6)


def test_identical_bpe_tokenizers_on_canonical_completions_give_the_same_tokenizer_loss(pair):
    _, bpe = pair
    task = get_task("arithmetic")
    teacher, student = tiny_llama(bpe, 32, 2, 1), tiny_llama(bpe, 16, 1, 2)
    prompts = encode(bpe, task_rows(task, 4, "train"), 100)
    batch = build_batch(prompts.prompt_ids, prompts.completion_ids, bpe.pad_token_id, bpe.eos_token_id)
    hidden, head, targets, m = _student_side(student, batch)
    ours = CrossTokenizerTeacher(teacher, bpe, bpe, prompts, len(bpe)).score(
        batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT).per_token(losses.reverse_kl, hidden, head, targets,
                                                                              None)
    same = teacher_divergence(losses.reverse_kl, hidden, head, LocalTeacher(teacher).score(
        batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT), m, None)
    torch.testing.assert_close(ours, same, rtol=1e-5, atol=1e-6)



def _row_logp(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] log-probs of every next token, from one plain forward pass over the row alone."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)


def _reference_cross_tokenizer_loss(divergence, student, teacher, student_tok, teacher_tok, xt, prompts, batch):
    """The loss per student completion token [N], rebuilt row by row from plain forward passes of both models (each on
    its own tokens, unpadded): per span, the event divergence at its first tokens, plus for a span of several tokens
    on either side the divergence of {its text, anything else} by the chain rule, put at its first student token. The
    alignment and the event partition are the library's (tested above); what is checked is the loss built on them."""
    ev, out = xt.events, []
    for b, ids in enumerate(batch.completion_ids()):
        prompt = prompts.prompt_ids[b]
        eos = ids[-1] == student_tok.eos_token_id
        body = ids[:-1] if eos else ids
        text = student_tok.decode(body, clean_up_tokenization_spaces=False)
        t_body = retokenize(teacher_tok, text)
        spans = align_spans(char_ends(student_tok, body, text, "student"),
                            char_ends(teacher_tok, t_body, text, "teacher"), len(text))
        if eos:
            spans.append((len(body), len(body) + 1, len(t_body), len(t_body) + 1))
        t_prompt = xt.prompts[tuple(prompt)]
        t_ids = t_body + ([teacher_tok.eos_token_id] if eos else [])
        s_logp = _row_logp(student, prompt + ids)[len(prompt) - 1:]  # [completion tokens, V]
        t_logp = _row_logp(teacher, t_prompt + t_ids)[len(t_prompt) - 1:]
        s_taken = s_logp.gather(1, torch.tensor(ids)[:, None])[:, 0]
        t_taken = t_logp.gather(1, torch.tensor(t_ids)[:, None])[:, 0]
        row = torch.zeros(len(ids), dtype=torch.float64)
        for s0, s1, t0, t1 in spans:
            s_events = event_logp(s_logp[s0:s0 + 1], ev.student_V, ev.num_events)
            t_events = event_logp(t_logp[t0:t0 + 1], ev.teacher_V, ev.num_events)
            row[s0] = divergence(s_events, t_events)[0]
            if s1 - s0 > 1 or t1 - t0 > 1:
                two = divergence(binary_logp(s_taken[s0:s1].sum()[None]), binary_logp(t_taken[t0:t1].sum()[None]))
                row[s0] += two[0]
        out.append(row)
    return torch.cat(out)


@pytest.fixture(scope="module")
def trained_char():
    """The arithmetic teacher that ships in opd/assets (character tokens): confident on the task's completions, so
    that the chain-rule probability of a span of several tokens is far from 0 for it, and the span term counts."""
    from opd.lm.recipes.supervised import get_teacher

    model, tokenizer, _ = get_teacher(progress=False)
    return model.eval(), tokenizer


@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("student_is", ["bpe", "char"], ids=["bpe_student", "char_student"])
def test_multi_token_spans_give_the_event_and_span_divergences_of_both_models(pair, trained_char, name, student_is):
    # A BPE student under a character teacher: a student token that holds several characters is a span of several
    # teacher tokens; the other way round, spans of several student tokens (no event term inside them). One side is
    # the trained character model, the other a fresh tiny BPE model; the batch holds the task's reference completions.
    _, bpe = pair
    trained, char = trained_char
    fresh = tiny_llama(bpe, 16, 1, 2)
    student, student_tok, teacher, teacher_tok = ((fresh, bpe, trained, char) if student_is == "bpe"
                                                  else (trained, char, fresh, bpe))
    prompts = encode(student_tok, task_rows(get_task("arithmetic"), 6, "train"), 100)
    batch = build_batch(prompts.prompt_ids, prompts.completion_ids, student_tok.pad_token_id, student_tok.eos_token_id)
    divergence = losses.get_divergence(name, **({"beta": 0.3} if name == "jsd" else {}))
    xt = CrossTokenizerTeacher(teacher, student_tok, teacher_tok, prompts, len(student_tok))
    signal = xt.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    if student_is == "char":
        assert (torch.bincount(signal.span_of_N)[:-1] > 1).any()  # spans of several student tokens
    hidden, head, targets, _ = _student_side(student, batch)
    got = signal.per_token(divergence, hidden, head, targets, None)
    want = _reference_cross_tokenizer_loss(divergence, student, teacher, student_tok, teacher_tok, xt, prompts, batch)
    # float32 against float64: a confident model's span log-probability near 0 is known to ~1e-6 absolute, so
    # log(1 − p) of it to a few parts in 1e3
    torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=1e-5)
    # the span terms weigh in this batch: a loss without them fails
    without_spans = _reference_cross_tokenizer_loss(lambda s, t: divergence(s, t) * (s.shape[-1] != 2), student,
                                                    teacher, student_tok, teacher_tok, xt, prompts, batch)
    assert signal.multi_K.sum() >= 5 and (want - without_spans).sum() > 0.2 * want.sum()

def _teacher_text_logp(teacher, char, prompt_ids, text, eos: bool) -> float:
    """log P_teacher(text [+ eos] | prompt) from one plain forward pass over the teacher's own tokens."""
    ids = list(prompt_ids) + char(text, add_special_tokens=False)["input_ids"] + ([char.eos_token_id] if eos else [])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, :-1].float(), -1)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def test_chain_rule_span_probabilities_add_up_to_the_teachers_probability_of_the_text(pair):
    char, bpe = pair
    teacher, student, prompts, batch = _models_and_batch(bpe, char)
    xt = CrossTokenizerTeacher(teacher, bpe, char, prompts, len(bpe))
    signal = xt.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    assert signal.multi_K.any()  # BPE tokens of several characters: multi-token spans
    row_of_N = batch.mask_BT.bool().nonzero()[:, 0]
    row_of_K = row_of_N[signal.first_K]
    for b, ids in enumerate(batch.completion_ids()):
        eos = ids[-1] == bpe.eos_token_id
        text = bpe.decode(ids[:-1] if eos else ids)
        want = _teacher_text_logp(teacher, char, xt.prompts[tuple(prompts.prompt_ids[b])], text, eos)
        assert signal.teacher_span_logp_K[row_of_K == b].sum().item() == pytest.approx(want, abs=1e-4)
    # and the teacher's events at a span start are its next-character probabilities (its tokens are characters)
    with torch.no_grad():
        t_events = torch.log_softmax(signal.teacher_head(signal.teacher_hidden_KD), -1)
    ev = xt.events
    for c in "0123456789+= ans":
        cid = char.convert_tokens_to_ids(c)
        got = event_logp(t_events, ev.teacher_V, ev.num_events)[:, ev.teacher_V[cid]]
        torch.testing.assert_close(got, t_events[:, cid])


def test_the_teacher_reads_the_prompt_in_its_own_chat_template_not_the_students(tmp_path):
    student_tok, teacher_tok = chat_tokenizers()
    chats = [[{"role": "system", "content": "add"}, {"role": "user", "content": "12+34="}],
             [{"role": "user", "content": "7+8="}]]
    rows = as_rows([{"messages": c} for c in chats])
    prompts = encode(student_tok, rows, 200)
    teacher, student = tiny_llama(teacher_tok, 32, 2, 1, max_pos=256), tiny_llama(student_tok, 16, 1, 2, max_pos=256)
    completion = student_tok("4+2+0=06 ans=46", add_special_tokens=False)["input_ids"]
    batch = build_batch(prompts.prompt_ids, [completion, completion], student_tok.pad_token_id,
                        student_tok.eos_token_id)
    xt = CrossTokenizerTeacher(teacher, student_tok, teacher_tok, prompts, len(student_tok))
    right = [teacher_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    wrong = [student_tok.decode(p) for p in prompts.prompt_ids]  # the student's rendering, re-tokenized
    assert right[0].startswith("[SYSTEM]: add") and wrong[0].startswith("<|system|>add")
    signal = xt.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    text = "4+2+0=06 ans=46"
    for b in range(2):
        r = _teacher_text_logp(teacher, teacher_tok, teacher_tok(right[b], add_special_tokens=False)["input_ids"], text,
                               True)
        w = _teacher_text_logp(teacher, teacher_tok, teacher_tok(wrong[b], add_special_tokens=False)["input_ids"], text,
                               True)
        got = signal.teacher_span_logp_K[b * (len(text) + 1):(b + 1) * (len(text) + 1)].sum().item()
        assert got == pytest.approx(r, abs=1e-4)
        assert abs(got - w) > 1e-3  # the student's template would have given the teacher another context


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_distill_with_cross_tokenizer_trains_a_bpe_student_from_a_character_teacher(pair, tmp_path):
    char, bpe = pair
    teacher = _save(tiny_llama(char, 32, 2, 1), char, tmp_path / "teacher")
    student = _save(tiny_llama(bpe, 16, 1, 2), bpe, tmp_path / "student")
    base = dict(student=student, teacher=teacher, steps=3, batch_size=4, train_examples=32, eval_examples=4,
                eval_every=3, save_every=3, sampling=SamplingArgs(max_new_tokens=12), progress=False)
    with pytest.raises(ValueError, match="--cross-tokenizer"):
        distill(DistillConfig(**base, out_dir=str(tmp_path / "refused")))
    for source, loss in (("student", "reverse_kl"), ("mixture", "jsd")):
        out = distill(DistillConfig(**base, cross_tokenizer=True, source=source, loss=loss,
                                    out_dir=str(tmp_path / f"run-{source}")))
        lines = [json.loads(x) for x in (tmp_path / f"run-{source}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2, 3]
        assert all(math.isfinite(m["loss"]) and m["loss"] >= 0 for m in lines)
        assert 0.0 <= out["accuracy"] <= 1.0


def test_cross_tokenizer_loss_moves_the_student_towards_the_teacher(pair):
    char, bpe = pair
    teacher, student, prompts, _ = _models_and_batch(bpe, char)
    xt = CrossTokenizerTeacher(teacher, bpe, char, prompts, len(bpe))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)

    def loss_on(seed):
        torch.manual_seed(seed)
        batch = sample(student, prompts.prompt_ids, bpe.pad_token_id, bpe.eos_token_id, 24)
        hidden, head, targets, _ = _student_side(student, batch)
        return xt.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT).per_token(
            losses.reverse_kl, hidden, head, targets, None).mean()

    with torch.no_grad():
        before = sum(loss_on(100 + s).item() for s in range(3))
    for step in range(30):
        opt.zero_grad()
        loss_on(step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_on(100 + s).item() for s in range(3))
    assert after < 0.7 * before


@pytest.mark.parametrize("kw,match", [
    (dict(teacher="http://localhost:1/v1"), "one local --teacher"),
    (dict(teacher="self"), "one local --teacher"),
    (dict(loss="sampled"), "divergence loss"),
    (dict(source="teacher", loss="sft"), "divergence loss"),
])
def test_cross_tokenizer_refuses_what_it_cannot_do_in_one_line(kw, match):
    args = dict(student="s", teacher="t", cross_tokenizer=True)
    args.update(kw)
    with pytest.raises(ValueError, match=match) as e:
        DistillConfig(**args)
    assert "\n" not in str(e.value)


def test_chat_prompts_for_a_teacher_without_a_chat_template_are_refused_in_one_line():
    student_tok, _ = chat_tokenizers()
    bare = char_tokenizer("".join(chr(i) for i in range(32, 127)))
    prompts = encode(student_tok, as_rows([{"messages": [{"role": "user", "content": "1+2="}]}]), 200)
    with pytest.raises(ValueError, match="teacher's tokenizer has no chat template") as e:
        CrossTokenizerTeacher(tiny_llama(bare, 16, 1, 1, max_pos=256), student_tok, bare, prompts, len(student_tok))
    assert "\n" not in str(e.value)
