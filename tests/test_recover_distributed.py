"""`linearize recover` under torchrun: 2 CPU processes (gloo, DDP) give the loss curve and the adapter of one process
on the same global batches, within fp32 tolerance."""
import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from linearize.models import tiny_model
from linearize.recovery import recover
texts = [f"Document {i}: " + "the cat sat on the mat and looked at the door. " * (2 + i % 3) for i in range(12)]
recover(tiny_model("llama"), rules="liger", data=texts, tokens=64 * 2 * 6, out=sys.argv[1], progress=False,
        seq_len=64, batch_size=2, lr=5e-3, evals_per_stage=1, eval_tokens=64, final_lengths=(64,),
        checkpoint_every=100, held_out_tokens=256)
"""


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "recover_state", "adapter.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_equal_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, str(script), one], check=True, env=env, timeout=900)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), two], check=True, env=env, timeout=900)
    a, b = (json.loads(open(os.path.join(f, "recover.json")).read()) for f in (one, two))
    assert a["world_size"] == 1 and b["world_size"] == 2
    la, lb = ([h["loss"] for h in r["history"]["loss"]] for r in (a, b))
    assert len(la) == len(lb) == 6  # 3 steps per stage
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)
    wa, wb = _adapter(one), _adapter(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)  # it trained
