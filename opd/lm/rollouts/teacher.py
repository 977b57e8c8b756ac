"""The teacher acts (source=teacher): a remote teacher samples through its server, several teachers each sample
their own rows, and `--teacher self` on a LoRA student samples with the adapters off."""

from __future__ import annotations

from dataclasses import replace

from opd.config import DistillConfig, SamplingArgs
from opd.lm.batch import Batch, layout
from opd.lm.data.prompts import PromptSet
from opd.lm.rollouts.actors import Actor, Draw, FixedActor, LocalActor
from opd.lm.teachers.local import LocalTeacher
from opd.lm.teachers.routed import Teachers
from opd.lm.teachers.self import AdapterOffTeacher


class TeacherServerActor(FixedActor):
    """A teacher behind a completions server samples (source=teacher with a remote teacher)."""

    source = "teacher"

    def __init__(self, client, prompts: PromptSet, pad_id: int, sampling: SamplingArgs):
        self.client, self.prompts, self.pad_id, self.s = client, prompts, pad_id, sampling

    def rollouts(self, draw: Draw) -> Batch:
        return self.sample([self.prompts.prompt_ids[i] for i in draw.rows], draw.seed)

    def sample(self, prompt_ids: list[list[int]], seed: int) -> Batch:
        """Completions of `prompt_ids` from the teacher's server, row i seeded with seed + i."""
        completions, _ = self.client.sample(prompt_ids, self.s.max_new_tokens, self.s.temperature, self.s.top_p,
                                            seed=seed)
        return layout(prompt_ids, completions, self.pad_id)

    def close(self) -> None:
        self.client.close()


class _TeacherActs(FixedActor):
    """What the teacher-sampling actors share: the teacher always acts, and holds no copy of the student to sync."""

    source = "teacher"


class RoutedActor(_TeacherActs):
    """source=teacher with several teachers: each row's completion is sampled by its own teacher, then the batch is
    laid out in draw order."""

    def __init__(self, actors: dict[str, Actor], prompts: PromptSet, pad_id: int):
        self.actors, self.prompts, self.pad_id = actors, prompts, pad_id

    def rollouts(self, draw: Draw) -> Batch:
        completions: list[list[int] | None] = [None] * len(draw.rows)
        for name, actor in self.actors.items():
            at = [j for j, i in enumerate(draw.rows) if self.prompts.routes[i] == name]
            if at:
                sub = actor.rollouts(replace(draw, rows=[draw.rows[j] for j in at]))
                for j, ids in zip(at, sub.completion_ids()):
                    completions[j] = ids
        return layout([self.prompts.prompt_ids[i] for i in draw.rows], completions, self.pad_id)

    def close(self) -> None:
        for actor in self.actors.values():
            actor.close()


def teacher_actor(cfg: DistillConfig, teacher, prompts: PromptSet, pad_id: int, eos_id: int | None) -> Actor:
    """The actor for source=teacher: the teacher samples, wherever it lives (routed per row for several)."""
    s = cfg.sampling
    if isinstance(teacher, Teachers):
        actors = {name: teacher_actor(cfg, t, prompts, pad_id, eos_id) for name, t in teacher.teachers.items()}
        return RoutedActor(actors, prompts, pad_id)
    if isinstance(teacher, LocalTeacher):
        return LocalActor(teacher.model, prompts, pad_id, eos_id, s, source="teacher")
    if isinstance(teacher, AdapterOffTeacher):
        return _AdapterOffActor(teacher, LocalActor(teacher.model, prompts, pad_id, eos_id, s, source="teacher"))
    from opd.lm.remote.sampler import RemoteSampler

    client = RemoteSampler(teacher.client.base_url, api_key=cfg.remote_api_key, timeout=cfg.remote_timeout,
                           max_retries=cfg.remote_max_retries)
    return TeacherServerActor(client, prompts, pad_id, s)


class _AdapterOffActor(_TeacherActs):
    """Samples from a LoRA student's base weights (source=teacher with --teacher self)."""

    def __init__(self, teacher: AdapterOffTeacher, inner: LocalActor):
        self.teacher, self.inner = teacher, inner

    def rollouts(self, draw: Draw) -> Batch:
        with self.teacher.frozen():
            return self.inner.rollouts(draw)

    def sample(self, prompt_ids: list[list[int]], seed: int) -> Batch:
        with self.teacher.frozen():
            return self.inner.sample(prompt_ids, seed)
