import json

from benchmarks import remote_hidden as rh


def test_quick_remote_hidden_grades_through_a_served_teacher_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(rh, "RESULTS", tmp_path)
    results = rh.main(rh.RemoteHiddenArgs(), quick=True)
    assert json.loads((tmp_path / "remote_hidden_quick.json").read_text())["teachers"] == results["teachers"]
    rows = results["teachers"]
    topk = rows["top-20 log-probs (RemoteTeacher)"]
    fp32, fp16 = (rows[f"hidden states, {d} (HiddenStateTeacher)"] for d in ("float32", "float16"))
    assert all(r["tokens_per_s"] > 0 and r["graded_tokens"] > 0 for r in rows.values())
    # the tiny model's hidden size is 32: base64 of 32 float32 values is 172 characters a token, plus the JSON around
    assert 128 < fp32["bytes_per_graded_token"] < 400
    assert fp16["bytes_per_graded_token"] < fp32["bytes_per_graded_token"]
    # which payload each teacher asked for: hidden states from the hidden-state teachers, log-probs from the other;
    # the local reference talks to no server
    assert set(fp32["bytes_by_endpoint"]) == set(fp16["bytes_by_endpoint"]) == {"/opd/hidden_states"}
    assert topk["bytes_by_endpoint"] and "/opd/hidden_states" not in topk["bytes_by_endpoint"]
    assert "bytes_by_endpoint" not in rows[rh.LOCAL]
    assert fp32["head_bytes"] > 20 * 32 * 4 and fp32["max_full_vocab_logp_error"] < 1e-4
    assert 1e-5 < fp16["max_full_vocab_logp_error"] < 0.05
    assert rh.section(results).count("\n| ") == 1 + 4  # header and four teachers
