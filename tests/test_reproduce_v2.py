"""jobs/reproduce_v2.py: the from-scratch chain's commands are the jobs' own, and its first stages run, log their
minutes and are skipped (not redone) when the chain runs again."""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from jobs import reproduce_v2 as R  # noqa: E402
from jobs import train_accm, train_clip, train_lvlm_v2  # noqa: E402


def test_every_command_of_the_chain_parses_with_its_jobs_flags(tmp_path):
    args = R.parse_args(["--workdir", str(tmp_path / "chain")])
    parsers = {"jobs/train_clip.py": train_clip.parse_args, "jobs/train_lvlm_v2.py": train_lvlm_v2.parse_args,
               "jobs/train_accm.py": train_accm.parse_args}
    chain = R.stages(args)
    assert [s.name for s in chain] == list(R.STAGES)
    for stage in chain:
        parsed = parsers[stage.argv[0]](stage.argv[1:] + stage.resume)
        assert str(tmp_path / "chain") in " ".join(stage.argv)  # everything stays in the work folder
        if stage.argv[0] == "jobs/train_accm.py":
            assert parsed.lvlm == str(tmp_path / "chain/lvlm") and parsed.clip == str(tmp_path / "chain/clip")
    stage1, stage2 = chain[1], chain[2]
    assert "--stage2-steps" in stage1.argv and stage1.argv[stage1.argv.index("--stage2-steps") + 1] == "0"
    assert all(flag in stage2.argv for flag in R.LVLM_STAGE2) and "--resume" in stage2.argv
    phase = train_lvlm_v2.parse_args(stage2.argv[1:]).shape_phase
    assert phase == R.LVLM_SHAPE_PHASE_STEPS and 0 < phase < R.LVLM_STAGE2_STEPS
    assert train_lvlm_v2.parse_args(stage2.argv[1:]).autocast == "auto"  # bf16 where the CPU has it natively
    assert "--autocast" not in stage1.argv  # stage 1 stays float32, byte-identical to the earlier runs
    # the eval stage measures val items, never a test seed
    evaluate = train_accm.parse_args(chain[-1].argv[1:])
    assert evaluate.stage == "eval" and evaluate.eval_split == "val"
    # --scale shrinks every step count, never to zero
    small = R.stages(R.parse_args(["--workdir", str(tmp_path), "--scale", "0.0001"]))
    assert small[0].argv[small[0].argv.index("--steps") + 1] == "1"


def test_the_first_stages_run_for_real_then_a_second_run_skips_them(tmp_path):
    work = tmp_path / "chain"
    argv = ["--workdir", str(work), "--preset", "tiny", "--scale", "0.002", "--threads", "1",
            "--stages", "clip,lvlm-stage1,lvlm-stage2"]
    record = R.main(argv)
    assert all(record["stages"][s]["done"] for s in ("clip", "lvlm-stage1", "lvlm-stage2"))
    assert (work / "clip/config.json").exists() and (work / "lvlm/model.safetensors").exists()
    state = json.loads((work / "lvlm/training_log.json").read_text())
    assert state["stage1_step"] == 2 and state["stage2_step"] == 8  # 750 and 4000 steps scaled by 0.002
    assert state["resumed_with"][-1]["drop_visual"] == 0.8  # stage 2 continued stage 1 with the levers
    assert state["resumed_with"][-1]["shape_phase"] == 1  # after a phase of 600 steps scaled by 0.002
    # stage 1 ran float32; stage 2 bf16 autocast where this CPU has native bf16, else float32 (--autocast auto)
    assert state["forward_precision"] == ["fp32", "bf16" if train_lvlm_v2.native_bf16() else "fp32"]
    assert "python jobs/train_clip.py" in record["stages"]["clip"]["command"]
    assert str(tmp_path) in record["stages"]["clip"]["command"]  # outside the repository: shown as given
    assert record["minutes"] == round(sum(sum(e["attempts"]) for e in record["stages"].values()), 2)
    again = R.main(argv)
    assert all(len(again["stages"][s]["attempts"]) == 1 for s in ("clip", "lvlm-stage1", "lvlm-stage2"))
    # a stage whose checkpoint exists is continued, not started over
    clip = next(s for s in R.stages(R.parse_args(argv)) if s.name == "clip")
    assert R.command_line(clip, resuming=clip.checkpoint.exists())[-1] == "--resume"
