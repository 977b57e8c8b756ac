"""Scoring through `opd.lm.hf.model` on an absolute-position model (GPT-2): left padding must be invisible.

The training step (`final_hidden`, for the student and a local teacher) runs left-padded batches; a rotary Llama cannot
show wrong position ids there (a constant shift of every position leaves its attention unchanged), GPT-2's learned
position embeddings do.
"""

import torch

from opd.lm.hf.decode import left_pad
from opd.lm.hf.model import final_hidden
from opd.lm.teachers.local import LocalTeacher
from tests.conftest import tiny_gpt2

ROWS = ("1+2=3", "123+456=579", "7+7=14", "2468+1357=3825")


def test_left_padded_scoring_of_an_absolute_position_model_equals_each_row_alone(tokenizer):
    model = tiny_gpt2(tokenizer, 32, 2, seed=0).eval()
    rows = [tokenizer(t)["input_ids"] for t in ROWS]
    ids_BL, attn_BL = left_pad(rows, tokenizer.pad_token_id)
    mask_BT = attn_BL[:, :-1] * attn_BL[:, 1:]  # every target with a real context
    with torch.no_grad():
        hidden_BLD = final_hidden(model, ids_BL, attn_BL)
        signal = LocalTeacher(model).score(ids_BL, attn_BL, mask_BT)  # the teacher's pass in a training step
        # the test can tell: positions that count the padding give other numbers on this model
        shifted_BLD = model(ids_BL, attention_mask=attn_BL, output_hidden_states=True).hidden_states[-1]
        for b, row in enumerate(rows):
            n = len(row)
            alone = model(torch.tensor([row]), output_hidden_states=True)
            torch.testing.assert_close(hidden_BLD[b, -n:], alone.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
            logp_TV = alone.logits[0, :-1].log_softmax(-1)
            taken_T = logp_TV.gather(1, torch.tensor(row[1:])[:, None])[:, 0]
            torch.testing.assert_close(signal.taken_logp_BT[b, -(n - 1):], taken_T, atol=1e-5, rtol=1e-5)
            if n < ids_BL.shape[1]:
                assert not torch.allclose(shifted_BLD[b, -n:], alone.hidden_states[-1][0], atol=1e-3)
