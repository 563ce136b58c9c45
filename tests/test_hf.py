"""Against Hugging Face transformers: the same logits on the same weights, and our checkpoints load
in it as they are. Skipped where transformers is not installed (it is a test-only dependency)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
import model as M

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent

CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=64,
           intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, initializer_range=0.02,
           hidden_act="silu", bos_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers(tmp_path, tied):
    ours = M.build_random({**CFG, "tie_word_embeddings": tied}, seed=1)
    with torch.no_grad():  # non-trivial biases and norms
        for name, p in ours.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    M.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    lengths = [9, 1, 30]
    ids = torch.randint(0, 128, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 9, 10, 40], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids, cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            ref = hf(input_ids=ids[None, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], ref, rtol=1e-5, atol=1e-5)


def test_trainer_checkpoint_loads_in_transformers(tmp_path):
    paths = demo.make_demo(tmp_path / "demo", train_rows=16, val_rows=4)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "train.py", f"data.train_files={paths['train']}", "data.train_batch_size=8",
                    "data.micro_batch_size_per_gpu=4", "data.multiturn.enable=true", "trainer.device=cpu",
                    f"model.partial_pretrain={paths['model']}", "trainer.total_epochs=1", "use_remove_padding=true",
                    f"trainer.default_local_dir={out}", "optim.lr=1e-3",
                    "data.chat_template=qwen2.5"], cwd=ROOT, check=True, capture_output=True)
    hf_dir = out / "global_step_2" / "huggingface"
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor(tok(text)["input_ids"])
    ours = M.load_pretrained(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.tensor([0, len(ids)], dtype=torch.int32)),
                                   hf(input_ids=ids[None]).logits[0], rtol=1e-5, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in hf.generation_config.eos_token_id
