"""The worked Llama-2-70B-Chat configuration composes and validates, and its memory arithmetic holds.

``experiment=paper_gsm8k_70b`` cannot run here (no GPUs, no 70B checkpoint),
so this checks what can be checked without them: the composed and validated
config (vLLM TP 8 on 8 nodes, ZeRO-3 over 8 x 8 ranks, bf16, gradient
checkpointing, the paper's N/K/temperatures), the DeepSpeed config the trainer
would build for 64 ranks, the SLURM allocation it asks for, and the numbers of
irpo.memory: parameter counts against the Hugging Face model built on the meta
device, activation bytes against what autograd saves in a Llama layer, and
docs/cluster.md quoting ``python -m irpo.memory`` verbatim.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from irpo import memory
from irpo.config import register_configs, temperature_at, to_config
from irpo.config_rules import validate
from irpo.training.deepspeed_trainer import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
register_configs()


def compose_70b(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = compose("config", overrides=["experiment=paper_gsm8k_70b", *overrides],
                      return_hydra_config=True)
    cfg = to_config(raw)
    validate(cfg)
    return cfg, raw.hydra.launcher


def test_worked_70b_config_composes_and_validates(monkeypatch):
    monkeypatch.delenv("IRPO_LLAMA70B", raising=False)
    cfg, launcher = compose_70b("method=rpo")
    assert (cfg.model.name, cfg.model.path, cfg.model.builtin) == (
        "llama2_70b_chat", "/models/Llama-2-70b-chat-hf", None)  # never opened while composing
    assert (cfg.model.dtype, cfg.trainer.lr) == ("bfloat16", 7e-7)
    # The paper's GSM8K settings.
    assert (cfg.dataset.name, cfg.method.name, cfg.beta, cfg.alpha) == ("gsm8k", "rpo", 0.1, 1.0)
    assert (cfg.samples_per_prompt, cfg.pairs_per_prompt, cfg.iterations) == (30, 10, 4)
    assert [temperature_at(cfg, t) for t in (1, 2, 3, 4)] == [0.8, 0.8, 1.3, 1.3]
    assert cfg.dataset.add_gold_to_winners and cfg.eval.maj_k == 32
    # Sampling: one tensor-parallel engine per node, in the model's bf16.
    s = cfg.sampler
    assert (s.name, s.tensor_parallel_size, s.nodes, s.dtype) == ("vllm", 8, 8, "auto")
    assert s.shard_dir == f"{cfg.output_root}/vllm-shards"  # writable, unlike the models directory
    # Training: ZeRO-3 over every GPU, checkpointed activations.
    t = cfg.trainer
    assert (t.name, t.zero_stage, t.num_processes, t.gradient_checkpointing) == ("deepspeed", 3, 8, True)
    # The allocation: 8 nodes x 8 GPUs, one driver task (submitit sees one node).
    assert launcher.additional_parameters.nodes == 8 and launcher.gpus_per_node == 8
    assert (launcher.nodes, launcher.tasks_per_node) == (1, 1)
    assert s.nodes <= launcher.additional_parameters.nodes


def test_deepspeed_config_of_the_64_ranks():
    cfg, launcher = compose_70b()
    world = cfg.trainer.num_processes * launcher.additional_parameters.nodes
    ds = deepspeed_config(cfg.trainer, cfg.model.dtype, world)
    assert world == 64 and ds["train_batch_size"] == 64
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (1, 1)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    # Why not the paper's 16: every one of the 64 ranks needs a pair of every micro-batch.
    paper_batch, _ = compose_70b("trainer.batch_size=16")  # validate cannot see the node count; preflight can (below)
    with pytest.raises(ValueError, match="batch_size=16 must be a multiple of .* 64 processes"):
        deepspeed_config(paper_batch.trainer, "bfloat16", world)


def test_checkpoint_path_from_the_environment(monkeypatch):
    monkeypatch.setenv("IRPO_LLAMA70B", "/shared/ckpt/llama-2-70b-chat")
    cfg, _ = compose_70b()
    assert cfg.model.path == "/shared/ckpt/llama-2-70b-chat"
    cfg, _ = compose_70b("model.path=/elsewhere")
    assert cfg.model.path == "/elsewhere"


def test_parameter_count_matches_the_hugging_face_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                     max_position_embeddings=4096, rms_norm_eps=1e-5)  # Llama-2-70b-hf's config.json
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    shape = memory.Shape.from_hf_config(hf.to_dict())
    assert shape == memory.LLAMA2_70B
    assert memory.LLAMA2_70B.params == model.num_parameters() == 68_976_648_192
    assert memory.LLAMA2_70B.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_kv_cache_and_state_arithmetic():
    s = memory.LLAMA2_70B
    assert memory.kv_bytes_per_token(s) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert memory.kv_bytes_per_token(s, tp=8) == 40_960  # one KV head per GPU
    assert memory.kv_bytes_per_token(s, tp=16) == 40_960  # fewer KV heads than GPUs: replicated
    smp = memory.sampling(s, tp=8)
    assert smp["weights_gib"] == pytest.approx(68_976_648_192 * 2 / 8 / 2**30)  # 16.06
    assert smp["kv_tokens"] == int((80 * 0.9 - smp["weights_gib"] - 3.0) * 2**30 // 40_960)
    z3 = memory.training(s, 64, 3, tokens=2048, checkpointing=True)
    assert z3["states_gib"] == pytest.approx(16 * 68_976_648_192 / 64 / 2**30)  # 1.10 TB / 64
    assert z3["peak_gib"] < 80
    assert memory.training(s, 64, 3, tokens=2048, checkpointing=False)["peak_gib"] > 80
    assert memory.training(s, 64, 2, tokens=2048, checkpointing=True)["states_gib"] > 128  # bf16 copy


def _saved_activation_bytes(shape: memory.Shape, layers: int, tokens_per_row: int) -> int:
    """Bytes autograd saves in a forward of a random bf16 Llama (parameters excluded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                     num_hidden_layers=layers, num_attention_heads=shape.heads,
                     num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                     attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, shape.vocab, (2, tokens_per_row))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(saved.values())


def test_layer_activation_bytes_match_what_autograd_saves():
    """A Llama layer at the 70B's proportions, 1/8 of its width (head_dim 128, 1 KV head per 8)."""
    small = memory.Shape(layers=1, hidden=1024, heads=8, kv_heads=1, intermediate=3584, vocab=512)
    for tokens_per_row in (32, 64):  # no term in the sequence length squared (SDPA)
        per_layer = (_saved_activation_bytes(small, 3, tokens_per_row)
                     - _saved_activation_bytes(small, 2, tokens_per_row))
        measured = per_layer / (2 * tokens_per_row)
        assert measured == pytest.approx(memory.layer_activation_bytes_per_token(small), rel=0.01)


def test_docs_quote_the_memory_report():
    docs = (REPO / "docs/cluster.md").read_text()
    for line in memory.report(memory.LLAMA2_70B).splitlines():
        assert line in docs, line


def test_preflight_checks_the_batch_against_the_allocation(monkeypatch):
    """Inside the 8-node allocation the driver fails before M0's evaluation, naming the field."""
    from irpo import launch
    from irpo.config import ConfigError
    from irpo.driver import preflight

    eight = launch.Allocation("7", tuple(f"gpu{i}" for i in range(8)), "10.0.0.1")
    monkeypatch.setattr(launch.Allocation, "from_env", classmethod(lambda cls, env=None: eight))
    cfg, _ = compose_70b()
    preflight(cfg)  # 64 pairs over 64 ranks
    small, _ = compose_70b("trainer.batch_size=16")
    with pytest.raises(ConfigError, match="trainer.batch_size=16 must be a multiple of .* 64 processes"):
        preflight(small)
    monkeypatch.setattr(launch.Allocation, "from_env", classmethod(lambda cls, env=None: None))
    preflight(small)  # one node outside SLURM: 8 ranks divide 16
