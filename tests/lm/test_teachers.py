"""Several teachers routed by a data column (`opd.lm.teachers.routed.Teachers`) and `--teacher self`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config import DistillConfig, LoraArgs, OptimArgs, SamplingArgs
from opd.config_notes import unused_flags
from opd.lm.teachers import routed as teachers_module
from opd.lm.rollouts.actors import Draw
from opd.lm.loop.build import make_teacher
from opd.lm.data.prompts import PromptSet
from opd.lm.hf.lora import load_student
from opd.lm.hf.decode import sample_completions
from opd.lm.hf.model import final_hidden, lm_head, load_model, unwrap
from opd.lm.batch import encode_prompts, layout
from opd.lm.rollouts.local import sample
from opd.lm.teachers.local import LocalTeacher
from opd.lm.teachers.self import AdapterOffTeacher
from opd.lm.rollouts.teacher import RoutedActor
from opd.lm.teachers.routed import Teachers
from opd.lm import train as train_module
from opd.lm.train import distill, divergence_from_config, student_loss, teacher_divergence
from opd.tasks import get_task
from tests.conftest import tiny_llama
from tests.lm.serve_helpers import live_server


@pytest.fixture(scope="module")
def second_teacher(model_dirs, tokenizer, tmp_path_factory):
    """A second local teacher, of another width than model_dirs' teacher (so its hidden states do not stack)."""
    path = tmp_path_factory.mktemp("models") / "teacher_b"
    tiny_llama(tokenizer, 24, 1, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher_url(model_dirs):
    """model_dirs' teacher behind `opd serve`."""
    from opd.lm.serve.app import ServeArgs, build_app, load_served

    args = ServeArgs(model_dir=model_dirs["teacher"], device="cpu")
    with live_server(build_app(*load_served(args), args)) as url:
        yield url + "/v1"


def routed_data(path: Path, n: int = 32, names=("a", "b")) -> str:
    """Arithmetic prompts with a `domain` column cycling through `names`."""
    rows = [{"prompt": e.prompt, "completion": e.completion, "answer": e.answer, "domain": names[i % len(names)]}
            for i, e in enumerate(get_task("arithmetic").examples(n, seed=0, split="train"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(dirs, tmp_path, **kw) -> DistillConfig:
    base = dict(student=dirs["student"], steps=2, batch_size=4, eval_every=0, save_every=100,
                sampling=SamplingArgs(max_new_tokens=8), out_dir=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return DistillConfig(**base)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def student_batch(dirs, tokenizer, n=6):
    student = load_model(dirs["student"])
    prompts = encode_prompts(tokenizer, [e.prompt for e in get_task("arithmetic").examples(n, 0, "test")], 100)
    torch.manual_seed(0)
    return student, sample(student, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 10)


GREEDY = SamplingArgs(max_new_tokens=8, temperature=0.0)


def greedy(model, prompts: list[list[int]], tokenizer) -> list[list[int]]:
    """`model`'s greedy completions (as GREEDY samples them)."""
    return sample_completions(unwrap(model), prompts, tokenizer.pad_token_id, tokenizer.eos_token_id,
                              GREEDY.max_new_tokens, temperature=0.0)


def batch_prompts(batch) -> list[list[int]]:
    return [ids[m.bool()][:n].tolist() for ids, m, n in zip(batch.input_ids_BL, batch.attention_mask_BL,
                                                             batch.prompt_lens)]


def record_steps(monkeypatch, tokenizer) -> list[tuple]:
    """Each step of `distill` records (the batch it trains on, each row's teacher name or None, the student's own
    greedy completions of the batch's prompts as the batch is graded): who sampled a batch shows in its tokens."""
    steps, real = [], train_module.accumulate

    def recording(student, teacher, batch, cfg, accelerator, step, routes=None):
        steps.append((batch, routes, greedy(student, batch_prompts(batch), tokenizer)))
        return real(student, teacher, batch, cfg, accelerator, step, routes)

    monkeypatch.setattr(train_module, "accumulate", recording)
    return steps


# --- several teachers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "sampled"])
def test_each_row_gets_the_loss_and_gradient_of_its_own_teacher_alone(model_dirs, tokenizer, second_teacher,
                                                                      teacher_url, loss):
    from opd.lm.remote.teacher import RemoteTeacher

    student, batch = student_batch(model_dirs, tokenizer)
    alone = {"a": LocalTeacher(load_model(model_dirs["teacher"])), "b": LocalTeacher(load_model(second_teacher)),
             "c": RemoteTeacher(teacher_url, top_k=5)}  # local full-vocabulary and remote top-k, mixed
    routes = ["b", "a", "c", "b", "c", "a"]
    config = DistillConfig(student="-", loss=loss)
    routed = Teachers(alone).score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT, routes)
    assert [p.name for p in routed.parts] == ["a", "b", "c"]
    assert [p.rows_R.tolist() for p in routed.parts] == [[1, 5], [0, 3], [2, 4]]

    # what each row's teacher gives when it scores the whole batch alone, picked row by row
    mask_BT = batch.mask_BT.bool()
    row_N = mask_BT.nonzero()[:, 0]
    hidden_ND = final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]
    signals = {name: t.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT) for name, t in alone.items()}
    if loss == "sampled":
        expected_BT = torch.stack([signals[r].taken_logp_BT[b] for b, r in enumerate(routes)])
        assert torch.allclose(routed.taken_logp_BT[mask_BT], expected_BT[mask_BT], atol=1e-5)
        return
    divergence, head = divergence_from_config(config), lm_head(student)
    each = {name: teacher_divergence(divergence, hidden_ND, head, s, mask_BT, None) for name, s in signals.items()}
    assert len({round(v[0].item(), 4) for v in each.values()}) == 3, "the teachers must differ"

    def routed_loss():
        return teacher_divergence(divergence, hidden_of(student, batch), head, routed, mask_BT, None)

    def assembled_loss():
        h = hidden_of(student, batch)
        alone_N = {name: teacher_divergence(divergence, h, head, s, mask_BT, None) for name, s in signals.items()}
        return torch.stack([alone_N[routes[b]][n] for n, b in enumerate(row_N.tolist())])

    assert torch.allclose(routed_loss(), assembled_loss(), atol=1e-5), (routed_loss() - assembled_loss()).abs().max()
    grads = []
    for per_token in (routed_loss, assembled_loss):
        student.zero_grad()
        per_token().mean().backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    assert all(torch.allclose(g1, g2, atol=1e-6) for g1, g2 in zip(*grads))


def hidden_of(student, batch):
    mask_BT = batch.mask_BT.bool()
    return final_hidden(student, batch.input_ids_BL, batch.attention_mask_BL)[:, :-1][mask_BT]


def test_per_teacher_metrics_split_the_loss_and_survive_gradient_accumulation(model_dirs, tokenizer, second_teacher):
    student, batch = student_batch(model_dirs, tokenizer)
    teachers = Teachers({"a": LocalTeacher(load_model(model_dirs["teacher"])),
                         "b": LocalTeacher(load_model(second_teacher))})
    routes = ["a", "a", "b", "a", "b", "b"]
    signal = teachers.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT, routes)
    loss, m = student_loss(student, batch, signal, DistillConfig(student="-"))
    m = teachers_module.per_teacher_means(m)
    tokens = {name: m[f"completion_tokens/teacher={name}"] for name in "ab"}
    rows = {name: [b for b, r in enumerate(routes) if r == name] for name in "ab"}
    assert tokens == {name: int(batch.mask_BT[rows[name]].sum()) for name in "ab"}
    # each teacher's mean is its share of the overall mean, weighted by its tokens
    total = sum(m[f"loss/teacher={name}"] * tokens[name] for name in "ab") / m["completion_tokens"]
    assert total == pytest.approx(m["loss"], rel=1e-5) and m["loss/teacher=a"] != pytest.approx(m["loss/teacher=b"])


def test_distill_with_two_local_teachers_and_a_remote_one_logs_per_teacher_and_resumes(
        model_dirs, second_teacher, teacher_url, tmp_path):
    data = routed_data(tmp_path / "rows.jsonl", names=("math", "code", "chat"))
    spec = f"math={model_dirs['teacher']},code={second_teacher},chat={teacher_url}"
    kw = dict(teachers=spec, teacher_column="domain", data=data, top_k=5, save_every=2,
              optim=OptimArgs(lr=1e-2, warmup_steps=1))
    distill(cfg(model_dirs, tmp_path / "a", steps=4, **kw))
    lines = metrics(tmp_path / "a" / "run")
    seen = {k for m in lines for k in m if "/teacher=" in k}
    assert {f"{kind}/teacher={name}" for kind in ("loss", "completion_tokens")
            for name in ("math", "code", "chat")} <= seen
    for m in lines:
        per = [n for k, n in m.items() if k.startswith("completion_tokens/teacher=")]
        assert sum(per) == m["completion_tokens"]
    saved = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert saved["teachers"] == spec and saved["teacher_column"] == "domain"
    distill(cfg(model_dirs, tmp_path / "b", steps=2, **kw))
    distill(cfg(model_dirs, tmp_path / "b", steps=4, resume=True, **kw))
    a, b = (load_file(tmp_path / x / "run" / "checkpoint" / "model.safetensors") for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss/teacher=code"] for m in metrics(tmp_path / "b" / "run") if "loss/teacher=code" in m] == \
        pytest.approx([m["loss/teacher=code"] for m in lines if "loss/teacher=code" in m], abs=1e-5)


def test_grad_accumulation_logs_the_per_teacher_means_of_one_pass(model_dirs, second_teacher, tmp_path):
    data = routed_data(tmp_path / "rows.jsonl")
    kw = dict(teachers=f"a={model_dirs['teacher']},b={second_teacher}", teacher_column="domain", data=data, steps=1,
              batch_size=8)
    distill(cfg(model_dirs, tmp_path / "one", **kw))
    distill(cfg(model_dirs, tmp_path / "two", optim=OptimArgs(grad_accum=4), **kw))
    one, two = metrics(tmp_path / "one" / "run")[0], metrics(tmp_path / "two" / "run")[0]
    for key in ("loss/teacher=a", "loss/teacher=b", "completion_tokens/teacher=a", "completion_tokens/teacher=b"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key


def test_source_teacher_samples_each_row_from_its_own_teacher(model_dirs, second_teacher, tmp_path):
    class Says:  # an actor whose every completion is one token, so the batch shows who sampled each row
        def __init__(self, token):
            self.token = token

        def rollouts(self, draw):
            return layout([[1] * (i + 1) for i in draw.rows], [[self.token] * 2 for _ in draw.rows], 0)

        def close(self):
            pass

    prompts = PromptSet([[1] * (i + 1) for i in range(4)], None, [{}] * 4, routes=["a", "b", "b", "a"])
    batch = RoutedActor({"a": Says(7), "b": Says(9)}, prompts, 0).rollouts(Draw(0, [3, 1, 0, 2, 1], "teacher", 0, ()))
    assert batch.completion_ids() == [[7, 7], [9, 9], [7, 7], [9, 9], [9, 9]]
    assert batch.prompt_lens == [4, 2, 1, 3, 2]
    # and a run with source=teacher and two local teachers trains, with per-teacher metrics
    data = routed_data(tmp_path / "rows.jsonl")
    distill(cfg(model_dirs, tmp_path, source="teacher", loss="sft", data=data, teacher_column="domain",
                teachers=f"a={model_dirs['teacher']},b={second_teacher}"))
    assert all("loss/teacher=a" in m or "loss/teacher=b" in m for m in metrics(tmp_path / "run"))


@pytest.mark.parametrize("who", ["local", "served", "several"])
def test_source_teacher_trains_on_the_teachers_greedy_completions_not_the_students(
        model_dirs, second_teacher, teacher_url, tokenizer, tmp_path, monkeypatch, who):
    # greedy sampling: each row's completion is a known function of whoever sampled it
    steps = record_steps(monkeypatch, tokenizer)
    if who == "several":
        kw = dict(teachers=f"a={model_dirs['teacher']},b={second_teacher}", teacher_column="domain",
                  data=routed_data(tmp_path / "rows.jsonl"))
    else:  # teacher_url serves model_dirs' teacher
        kw = dict(teacher=model_dirs["teacher"] if who == "local" else teacher_url, top_k=5)
    distill(cfg(model_dirs, tmp_path, steps=1, batch_size=8, source="teacher", loss="sft", sampling=GREEDY, **kw))
    ((batch, routes, student_greedy),) = steps
    routes = routes or ["a"] * len(student_greedy)
    prompts = batch_prompts(batch)
    by_teacher = {"a": greedy(load_model(model_dirs["teacher"]), prompts, tokenizer),
                  "b": greedy(load_model(second_teacher), prompts, tokenizer)}
    expected = [by_teacher[r][i] for i, r in enumerate(routes)]
    assert batch.completion_ids() == expected
    # the test can tell them apart: the student, and the other teacher, complete these prompts otherwise
    assert sum(e != s for e, s in zip(expected, student_greedy)) >= len(expected) - 1
    assert sum(a != b for a, b in zip(*by_teacher.values())) >= len(expected) - 1
    assert who != "several" or set(routes) == {"a", "b"}


def test_bad_routes_and_teacher_lists_fail_before_any_model_loads(model_dirs, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the routes were checked")

    monkeypatch.setattr("opd.lm.hf.lora.load_model", no_loading)
    monkeypatch.setattr("opd.lm.loop.build.load_model", no_loading)
    data = routed_data(tmp_path / "rows.jsonl", names=("a", "b", "bio"))
    with pytest.raises(ValueError, match=r"row 2: domain='bio' names no teacher; --teachers names a, b"):
        distill(cfg(model_dirs, tmp_path, teachers="a=X,b=Y", teacher_column="domain", data=data))
    with pytest.raises(ValueError, match=r"has no column 'topic' \(--teacher-column\); its columns: .*domain"):
        distill(cfg(model_dirs, tmp_path, teachers="a=X,b=Y", teacher_column="topic", data=data))
    with pytest.raises(ValueError, match=r"prompts has no column 'domain'"):  # a built-in task has no such column
        distill(cfg(model_dirs, tmp_path, teachers="a=X,b=Y", teacher_column="domain"))
    for kw, message in (
        (dict(teachers="a=X", teacher="Y", teacher_column="domain"), "either --teacher or --teachers"),
        (dict(teachers="a=X"), "--teachers needs --teacher-column"),
        (dict(teachers="a=X,bX", teacher_column="d"), "entry 'bX' is not NAME=MODEL"),
        (dict(teachers="a=X,a=Y", teacher_column="d"), "names 'a' twice"),
        (dict(teachers=" , ", teacher_column="d"), "--teachers is empty"),
        (dict(teachers=f"a={tmp_path / 'run'}", teacher_column="d"), "is the teacher a's model directory"),
    ):
        with pytest.raises(ValueError, match=message):
            cfg(model_dirs, tmp_path, **kw)
    assert not (tmp_path / "run").exists()
    assert any("--teacher-column does nothing" in n for n in unused_flags(cfg(model_dirs, tmp_path, teacher="T",
                                                                              teacher_column="d")))
    assert any("--top-k does nothing" in n for n in unused_flags(cfg(model_dirs, tmp_path, teachers="a=D",
                                                                     teacher_column="d", top_k=5)))
    assert not unused_flags(cfg(model_dirs, tmp_path, teachers="a=D,b=http://h:1/v1", teacher_column="d", top_k=5))


# --- --teacher self --------------------------------------------------------------------------------------------------


def nudge(scale=0.3):
    """A callback that moves the student's trainable weights once, after update 1, by a fixed random amount."""
    def callback(step, student, m):
        if step == 1:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in student.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * scale)
    return callback


@pytest.mark.parametrize("lora", [LoraArgs(), LoraArgs(r=4, target_modules=("q_proj", "v_proj"))], ids=["full", "lora"])
def test_a_self_teacher_is_the_frozen_start_also_after_a_resume(model_dirs, tmp_path, monkeypatch, lora):
    # No second model from disk on a fresh run (and none at all, nor a copy, for LoRA).
    loads = []
    monkeypatch.setattr("opd.lm.teachers.self.load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    kw = dict(teacher="self", lora=lora, save_every=2, optim=OptimArgs(lr=1e-2, warmup_steps=1))
    distill(cfg(model_dirs, tmp_path / "a", steps=3, **kw), callbacks=[nudge()])
    straight = metrics(tmp_path / "a" / "run")
    assert straight[0]["loss"] < 1e-6, "the student is its own teacher at the start"
    assert straight[1]["loss"] > 1e-3 and straight[2]["loss"] > 1e-3, "the teacher must not follow the student"
    assert loads == []
    distill(cfg(model_dirs, tmp_path / "b", steps=2, **kw), callbacks=[nudge()])
    distill(cfg(model_dirs, tmp_path / "b", steps=3, resume=True, **kw))
    resumed = metrics(tmp_path / "b" / "run")
    # the resumed step is graded by the start weights, as in the run that never stopped (not by the checkpoint's)
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-4)
    assert len(loads) == (0 if lora.r else 1)


def test_a_lora_self_teacher_is_the_student_with_its_adapters_off(model_dirs, tokenizer):
    lora = LoraArgs(r=4, target_modules=("q_proj", "v_proj", "lm_head"))
    student = load_student(model_dirs["student"], lora, None, "cpu")
    teacher = make_teacher(DistillConfig(student=model_dirs["student"], teacher="self", lora=lora), student, tokenizer)
    assert isinstance(teacher, AdapterOffTeacher) and teacher.model is student  # no copy: the same parameters
    base = load_model(model_dirs["student"])
    _, batch = student_batch(model_dirs, tokenizer)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # the adapted student now differs from its base, in the head too
    student.train()
    signal = teacher.score(batch.input_ids_BL, batch.attention_mask_BL, batch.mask_BT)
    assert student.training and all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)
    want = base(batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits[:, :-1]
    got = signal.head(signal.hidden_BTD)  # the head too is the base's, when the loss calls it later
    mask = batch.mask_BT.bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    adapted = student(batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits[:, :-1]
    assert not torch.allclose(adapted[mask], want[mask], atol=1e-2)


def test_source_teacher_with_a_lora_self_teacher_samples_from_the_base_after_the_adapters_moved(
        model_dirs, tokenizer, tmp_path, monkeypatch):
    steps = record_steps(monkeypatch, tokenizer)
    distill(cfg(model_dirs, tmp_path, steps=3, batch_size=8, teacher="self", source="teacher", loss="sft",
                lora=LoraArgs(r=4), sampling=GREEDY, optim=OptimArgs(lr=1e-2, warmup_steps=1)), callbacks=[nudge()])
    assert [m["source"] for m in metrics(tmp_path / "run")] == ["teacher"] * 3
    base = load_model(model_dirs["student"])
    for batch, _, _ in steps:
        assert batch.completion_ids() == greedy(base, batch_prompts(batch), tokenizer)
    # from the step after the first update (and a nudge of the adapters) on, the adapted student samples otherwise
    for batch, _, adapted in steps[1:]:
        assert sum(a != c for a, c in zip(adapted, batch.completion_ids())) >= len(adapted) // 2


def test_teacher_self_and_teachers_are_in_the_help_and_a_lora_self_teacher_ignores_teacher_dtype(model_dirs, tmp_path,
                                                                                                  capsys):
    from opd.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--teachers" in text and "--teacher-column" in text and "`self`: the student's own starting" in text
    notes = unused_flags(cfg(model_dirs, tmp_path, teacher="self", lora=LoraArgs(r=4), teacher_dtype="bfloat16"))
    assert any("--teacher-dtype does nothing" in n for n in notes)
    assert not unused_flags(cfg(model_dirs, tmp_path, teacher="self", teacher_dtype="bfloat16"))


def test_self_as_one_of_several_teachers_anchors_its_rows_at_the_start(model_dirs, tmp_path):
    data = routed_data(tmp_path / "rows.jsonl", names=("new", "old"))
    distill(cfg(model_dirs, tmp_path, steps=1, batch_size=8, data=data, teacher_column="domain",
                teachers=f"new={model_dirs['teacher']},old=self"))
    first = metrics(tmp_path / "run")[0]
    assert first["loss/teacher=old"] < 1e-6 and first["loss/teacher=new"] > 1e-3  # random tiny models: small KLs
