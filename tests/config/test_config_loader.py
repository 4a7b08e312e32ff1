"""load_config: layers, overrides as a shell passes them, error messages, validation, derived values."""

import logging
import shlex

import pytest

from lmforge.config import (
    PretrainConfig,
    cfg_warnings,
    load_config,
    model_config_from,
    parse_override,
    to_dict,
    to_yaml,
    validate,
)
from lmforge.config.schema import tokenizer_path
from lmforge.errors import ConfigError

NEMO_LINE = ("trainer.devices=4 trainer.num_nodes=2 model.micro_batch_size=6 model.global_batch_size=192 "
             "model.optim.betas=[0.9,0.95] model.data.splits_string='980,10,10'")


def _check_nemo_line(cfg):
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2
    assert cfg.model.micro_batch_size == 6 and cfg.model.global_batch_size == 192
    assert cfg.trainer.accumulate_grad_batches == 4  # 192 / (6 x 8)
    assert cfg.model.optim.betas == [0.9, 0.95]
    assert cfg.model.data.splits_string == "980,10,10"


def test_nemo_override_line_as_the_shell_passes_it():
    _check_nemo_line(load_config("gpt3/126m", shlex.split(NEMO_LINE)))


def test_nemo_override_line_with_quotes_surviving():
    _check_nemo_line(load_config("gpt3/126m", NEMO_LINE.split()))
    cfg = load_config("gpt3/126m", ['"trainer.devices=2"', "model.data.splits_string=\"99,1,0\"",
                                    "model.tokenizer.model='/data/tok'"])
    assert cfg.trainer.devices == 2 and cfg.model.data.splits_string == "99,1,0"
    assert cfg.model.tokenizer.model == "/data/tok"


def test_override_values_are_yaml():
    assert parse_override("model.tokenizer.model=null") == ("model.tokenizer.model", None)
    assert parse_override("model.optim.lr=6e-4") == ("model.optim.lr", 6e-4)
    assert parse_override("+model.seed=7") == ("model.seed", 7)
    assert parse_override("model.data.data_prefix=[1.0,data/corpus_text_document]") == (
        "model.data.data_prefix", [1.0, "data/corpus_text_document"])
    cfg = load_config("tiny/llama", ["model.num_query_groups=null", "model.data.data_prefix=data/x_text_document",
                                     "exp_manager.create_tensorboard_logger=false"])
    assert cfg.model.num_query_groups is None
    assert cfg.model.data.data_prefix == "data/x_text_document"
    assert cfg.exp_manager.create_tensorboard_logger is False


def test_malformed_override_shows_the_expected_form():
    with pytest.raises(ConfigError, match="KEY=VALUE") as e:
        load_config("tiny/gpt", ["trainer.devices"])
    assert "trainer.devices=4" in str(e.value)
    with pytest.raises(ConfigError, match="not a dotted key"):
        load_config("tiny/gpt", ["trainer devices=4"])


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config("tiny/gpt", ["trainer.devices=abc"])
    msg = str(e.value)
    assert "trainer.devices='abc'" in msg and "expected an integer" in msg and "command line" in msg
    with pytest.raises(ConfigError, match=r"model\.optim\.betas.*list of numbers"):
        load_config("tiny/gpt", ["model.optim.betas=0.9"])
    with pytest.raises(ConfigError, match="group of settings"):
        load_config("tiny/gpt", ["model.optim=adamw"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_config("tiny/gpt", ["model.micro_batchsize=6"])
    msg = str(e.value)
    assert "'model.micro_batchsize'" in msg and "command line" in msg
    assert "did you mean 'model.micro_batch_size'?" in msg
    with pytest.raises(ConfigError, match="did you mean 'model.micro_batch_size'"):
        load_config("tiny/gpt", ["trainer.micro_batch_size=6"])
    with pytest.raises(ConfigError, match="did you mean 'trainer.devices'"):
        load_config("tiny/gpt", ["trainer.device=2"])
    with pytest.raises(ConfigError, match="did you mean 'model.optim.sched.warmup_steps'"):
        load_config("tiny/gpt", ["model.optim.sched.warmup=10"])


def test_yaml_typo_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  max_steps: 10\nmodel:\n  num_layer: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "line 4" in msg and "did you mean 'model.num_layers'?" in msg


def test_yaml_wrong_type_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  max_steps: 10\n  devices: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "trainer.devices='two'" in msg and "integer" in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  devices: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+: not valid YAML"):
        load_config(path)


def test_missing_file_and_unknown_recipe():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")
    with pytest.raises(ConfigError) as e:
        load_config("gpt3/126")
    assert "did you mean 'gpt3/126m'?" in str(e.value) and "llama3.2/1b" in str(e.value)


def test_dict_source_and_source_name():
    cfg = load_config({"trainer": {"max_steps": 5}, "model": {"num_layers": 2}})
    assert cfg.model.num_layers == 2 and isinstance(cfg, PretrainConfig)
    with pytest.raises(ConfigError, match="checkpoint step_5/config.json"):
        load_config({"trainer": {"max_step": 5}}, source_name="checkpoint step_5/config.json")


def test_validate_collects_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("tiny/gpt", ["model.hidden_dropout=1.5", "model.optim.lr=-1", "model.optim.sched.min_lr=0",
                                 "exp_manager.checkpoint_callback_params.mode=avg", "trainer.devices=0",
                                 "model.data.splits_string=a,b"])
    msg = str(e.value)
    assert "problems in the config" in msg
    for part in ("model.hidden_dropout=1.5", "model.optim.lr=-1", "mode='avg'", "trainer.devices=0",
                 "splits_string"):
        assert part in msg, part


def test_schedule_and_step_problems():
    with pytest.raises(ConfigError, match="min_lr=0.1 exceeds model.optim.lr"):
        load_config("tiny/gpt", ["model.optim.sched.min_lr=0.1"])
    with pytest.raises(ConfigError, match="warmup_steps \\+ constant_steps = 60 \\+ 50 = 110 exceeds"):
        load_config("tiny/gpt", ["model.optim.sched.warmup_steps=60", "model.optim.sched.constant_steps=50"])
    with pytest.raises(ConfigError, match="neither trainer.max_steps nor trainer.max_epochs"):
        load_config("tiny/gpt", ["trainer.max_steps=-1"])
    with pytest.raises(ConfigError, match="fraction of max_steps"):
        load_config("tiny/gpt", ["trainer.val_check_interval=2000.0"])


def test_positions_must_cover_the_sequence():
    with pytest.raises(ConfigError, match="seq_length=256 exceeds model.max_position_embeddings=128, a hard limit "
                                          r"\(the model's learned position table has 128 rows"):
        load_config("tiny/gpt", ["model.encoder_seq_length=256"])
    # Issue 15.4: RoPE models hold max_position_embeddings rotary positions too (the forward refuses longer
    # inputs), so this is refused here rather than as a ValueError at step 1.
    with pytest.raises(ConfigError, match=r"model.data.seq_length=512 exceeds model.max_position_embeddings=256, a "
                                          r"hard limit \(the model's rotary tables hold 256 positions; "
                                          r"position_embedding_type=rope\); raise model.max_position_embeddings to "
                                          r"at least 512, or lower model.data.seq_length"):
        load_config("tiny/llama", ["model.encoder_seq_length=512"])
    with pytest.raises(ConfigError, match="model.data.seq_length=300 exceeds .* position_embedding_type=alibi"):
        load_config("tiny/llama", ["model.position_embedding_type=alibi", "model.data.seq_length=300"])
    cfg = load_config("tiny/llama", ["model.encoder_seq_length=512", "model.max_position_embeddings=512"])
    assert cfg.model.data.seq_length == 512


def test_architecture_problems_come_from_model_config():
    with pytest.raises(ConfigError, match="num_query_groups=3"):
        load_config("tiny/llama", ["model.num_query_groups=3"])
    with pytest.raises(ConfigError, match="activation='relu'"):
        load_config("tiny/gpt", ["model.activation=relu"])


def test_derived_values():
    cfg = load_config("tiny/gpt", ["trainer.max_steps=40", "model.global_batch_size=32"])
    assert cfg.trainer.accumulate_grad_batches == 4
    assert cfg.model.optim.sched.max_steps == 40
    assert cfg.model.data.seq_length == cfg.model.encoder_seq_length == 128
    assert cfg.trainer.val_check_steps() == 25
    cfg = load_config("tiny/gpt", ["trainer.val_check_interval=0.5"])
    assert cfg.trainer.val_check_steps() == 50


def test_three_batch_numbers_must_agree():
    with pytest.raises(ConfigError) as e:
        load_config("tiny/gpt", ["trainer.accumulate_grad_batches=2"])
    assert "trainer.accumulate_grad_batches=null" in str(e.value) and "8 x 1 x 2 = 16" in str(e.value)


@pytest.mark.parametrize("given, canonical", [
    (32, "32"), ("32", "32"), ("32-true", "32"),
    (16, "16-mixed"), ("16", "16-mixed"), ("16-mixed", "16-mixed"),
    ("bf16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed"),
])
def test_precision_aliases(given, canonical):
    assert load_config("tiny/gpt", [f"trainer.precision={given}"]).trainer.precision == canonical


def test_unknown_precision_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config("tiny/gpt", ["trainer.precision=fp4"])
    assert "trainer.precision='fp4'" in str(e.value) and "bf16-mixed" in str(e.value) and "32-true" in str(e.value)
    assert "or fp8" in str(e.value)  # trainer.precision=fp8: bf16-mixed with float8 projections (model.fp8)


def test_nemo_ignored_keys_are_accepted_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge.config"):
        cfg = load_config("gpt3/126m", ["model.megatron_amp_O2=True", "model.transformer_engine=True",
                                        "model.bias_activation_fusion=True", "model.sequence_parallel=False",
                                        "model.nsys_profile.start_step=5", "model.optim.bucket_cap_mb=200"])
    warnings = cfg_warnings(cfg)
    assert len(warnings) == 1
    line = warnings[0]
    assert "model.megatron_amp_O2=true" in line and "model.transformer_engine=true" in line
    assert "bias_activation_fusion" not in line and "sequence_parallel" not in line and "nsys" not in line
    assert any("megatron_amp_O2" in r.getMessage() for r in caplog.records)
    assert not hasattr(cfg.model, "megatron_amp_O2")
    assert cfg_warnings(load_config("gpt3/126m")) == []


def test_nemo_keys_that_would_change_the_model_must_stay_at_default():
    assert load_config("tiny/llama", ["model.rotary_percentage=1.0"]).model.num_layers == 4
    with pytest.raises(ConfigError, match="model.rotary_percentage=0.5.*only NeMo's default 1.0"):
        load_config("tiny/llama", ["model.rotary_percentage=0.5"])


def test_nemo_style_yaml_loads(tmp_path):
    """A config written the way NeMo's megatron_gpt_config.yaml and launcher files are written."""
    path = tmp_path / "nemo.yaml"
    path.write_text("""\
name: megatron_gpt
restore_from_path: null
trainer:
  devices: 1
  num_nodes: 1
  accelerator: gpu
  precision: bf16
  logger: False
  enable_checkpointing: False
  use_distributed_sampler: False
  max_epochs: null
  max_steps: 1000
  log_every_n_steps: 10
  val_check_interval: 100
  limit_val_batches: 50
  limit_test_batches: 500
  accumulate_grad_batches: null
  gradient_clip_val: 1.0
  benchmark: False
exp_manager:
  explicit_log_dir: null
  exp_dir: null
  name: megatron_gpt
  create_wandb_logger: False
  wandb_logger_kwargs:
    project: null
    name: null
  resume_if_exists: True
  resume_ignore_no_checkpoint: True
  resume_from_checkpoint: ${model.resume_from_checkpoint}
  create_checkpoint_callback: True
  checkpoint_callback_params:
    monitor: val_loss
    save_top_k: 10
    mode: min
    always_save_nemo: False
    filename: 'megatron_gpt--{val_loss:.2f}-{step}-{consumed_samples}'
    model_parallel_size: ${multiply:${model.tensor_model_parallel_size}, ${model.pipeline_model_parallel_size}}
  log_step_timing: True
  step_timing_kwargs:
    sync_cuda: True
    buffer_size: 5
model:
  micro_batch_size: 4
  global_batch_size: 8
  tensor_model_parallel_size: 1
  pipeline_model_parallel_size: 1
  resume_from_checkpoint: null
  encoder_seq_length: 512
  max_position_embeddings: ${.encoder_seq_length}
  num_layers: 12
  hidden_size: 768
  ffn_hidden_size: ${multiply:4, ${.hidden_size}}
  num_attention_heads: 12
  init_method_std: 0.02
  use_scaled_init_method: True
  hidden_dropout: 0.1
  attention_dropout: 0.1
  ffn_dropout: 0.0
  kv_channels: null
  apply_query_key_layer_scaling: True
  normalization: layernorm
  layernorm_epsilon: 1e-5
  make_vocab_size_divisible_by: 128
  pre_process: True
  post_process: True
  persist_layer_norm: True
  bias: True
  activation: gelu
  transformer_block_type: pre_ln
  position_embedding_type: learned_absolute
  rotary_percentage: 1.0
  share_embeddings_and_output_weights: True
  tokenizer:
    library: megatron
    type: GPT2BPETokenizer
    model: null
    vocab_file: null
    merge_file: null
    delimiter: null
  native_amp_init_scale: 4294967296
  megatron_amp_O2: False
  bias_activation_fusion: True
  masked_softmax_fusion: True
  seed: 1234
  activations_checkpoint_granularity: null
  activations_checkpoint_method: null
  activations_checkpoint_num_layers: null
  sequence_parallel: False
  transformer_engine: False
  fp8: False
  nsys_profile:
    enabled: False
    start_step: 10
    end_step: 10
    ranks: [0]
  data:
    data_prefix: [.5, /raid/data/a_text_document, .5, /raid/data/b_text_document]
    index_mapping_dir: null
    data_impl: mmap
    splits_string: 900,50,50
    seq_length: ${model.encoder_seq_length}
    skip_warmup: True
    num_workers: 2
    dataloader_type: single
    reset_position_ids: False
    reset_attention_mask: False
    eod_mask_loss: False
    validation_drop_last: True
    shuffle_documents: True
  optim:
    name: distributed_fused_adam
    bucket_cap_mb: 200
    overlap_grad_sync: True
    lr: 2e-4
    weight_decay: 0.01
    betas:
    - 0.9
    - 0.98
    sched:
      name: CosineAnnealing
      warmup_steps: 500
      constant_steps: 500
      min_lr: 2e-5
""")
    cfg = load_config(path, ["trainer.devices=2", "model.global_batch_size=16"])
    m = cfg.model
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert m.ffn_hidden_size == 3072 and m.max_position_embeddings == 512 and m.data.seq_length == 512
    assert m.layernorm_epsilon == 1e-5 and m.optim.lr == 2e-4 and m.optim.sched.min_lr == 2e-5
    assert m.data.data_prefix == [0.5, "/raid/data/a_text_document", 0.5, "/raid/data/b_text_document"]
    assert m.optim.name == "fused_adam" and cfg.trainer.accumulate_grad_batches == 2
    assert cfg.exp_manager.checkpoint_callback_params.save_top_k == 10
    assert cfg.exp_manager.log_dir.endswith("megatron_gpt")
    assert tokenizer_path(cfg) is None  # a Megatron GPT2BPETokenizer class name is not a path
    assert any("distributed_fused_adam" in w for w in cfg_warnings(cfg))


def test_data_prefix_shapes():
    for good in ("data/x_text_document", "[data/x_text_document]", "[0.3,data/a,0.7,data/b]"):
        load_config("tiny/gpt", [f"model.data.data_prefix={good}"])
    with pytest.raises(ConfigError, match="data_prefix"):
        load_config("tiny/gpt", ["model.data.data_prefix=[0.3,data/a,0.7]"])
    with pytest.raises(ConfigError, match="data_prefix"):
        load_config("tiny/gpt", ["model.data.data_prefix={train: [1.0, data/a]}"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config("llama3.2/1b", ["trainer.devices=4", "model.optim.betas=[0.9,0.95]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert "betas: [0.9, 0.95]" in to_yaml(cfg)


def test_validate_on_a_config_built_in_code():
    cfg = PretrainConfig()
    cfg.trainer.max_steps = 10
    validate(cfg)
    cfg.model.attention_dropout = 1.0
    with pytest.raises(ConfigError, match="attention_dropout"):
        validate(cfg)


def test_model_config_from_pads_vocab_and_maps_fields():
    cfg = load_config("gpt3/126m")
    mc = model_config_from(cfg, 50257)
    assert mc.vocab_size == 50304
    assert (mc.hidden_size, mc.num_layers, mc.num_attention_heads, mc.ffn_hidden_size) == (768, 12, 12, 3072)
    assert mc.position_embedding_type == "learned_absolute" and mc.share_embeddings_and_output_weights
    assert mc.max_position_embeddings == 2048 and mc.init_method_std == 0.023
    mc = model_config_from(load_config("llama3.2/1b", ["model.activation=fast-swiglu"]).model, 128256)
    assert mc.vocab_size == 128256 and mc.activation == "swiglu" and mc.num_query_groups == 8
    assert mc.rotary_base == 500000.0 and mc.max_position_embeddings == 8192
    with pytest.raises(ConfigError, match="vocab_size"):
        model_config_from(cfg, 0)


def test_tokenizer_path():
    assert tokenizer_path(load_config("tiny/gpt", ["model.tokenizer.model=tok/"])) == "tok/"
    assert tokenizer_path(load_config("tiny/gpt", ["model.tokenizer.type=some/folder"])) == "some/folder"
    assert tokenizer_path(load_config("tiny/gpt")) is None


@pytest.mark.parametrize("key", ["always_save_nemo", "save_nemo_on_train_end"])
def test_saving_nemo_archives_while_training_is_refused_not_ignored(key):
    """The users' list sets always_save_nemo=False (what lmforge does); True would write .nemo files in NeMo."""
    load_config("gpt3/126m", [f"exp_manager.checkpoint_callback_params.{key}=False"])
    with pytest.raises(ConfigError, match=rf"{key}=true .*lmforge supports only NeMo's default false.*"
                                          r"`lmforge export CHECKPOINT OUT.nemo --format nemo`"):
        load_config("gpt3/126m", [f"exp_manager.checkpoint_callback_params.{key}=True"])
