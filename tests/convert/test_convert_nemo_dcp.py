"""NeMo torch_dist archives (``model_weights/`` written by torch.distributed.checkpoint, in megatron.core's key
layout: per-layer tensors stacked along a leading layer dimension, global (unsplit) tensors) import and compute
the logits of the Hugging Face model they were made from; chunked tensors (as TP x PP ranks save them) are
reassembled; byte items (``_extra_state``) are never unpickled; damage is reported, nothing half-written."""

import io
import pickle
import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties

from lmforge.convert.hf import convert
from lmforge.errors import CheckpointError
from lmforge.models import ModelConfig, Transformer
from lmforge.train.checkpoint import load_model
from tests.convert.test_convert_nemo import imported_logits, megatron_state, nemo_config, write_members

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=88, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                              rope_theta=500000.0, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=48, n_inner=88, n_layer=4, n_head=4, n_positions=64,
                                            activation_function="gelu"),
}


class _Trap:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def source(tmp_path, request):
    """(HF model, lmforge Transformer) of a tiny random HF model converted to lmforge."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[request.param]()).eval()
    hf.save_pretrained(tmp_path / "hf_src")
    convert(tmp_path / "hf_src", tmp_path / "lm_src", to="lmforge", progress=False)
    weights, config = load_model(tmp_path / "lm_src")
    model = Transformer(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(weights, strict=False)
    return hf, model.eval()


def mcore_global_state(model: Transformer) -> dict:
    """The torch_dist key layout: global tensors, ``model.decoder.layers.<name>`` stacked over layers."""
    flat, out, stacked = megatron_state(model, 1)[0], {}, {}
    for key, value in flat.items():
        m = re.match(r"model\.decoder\.layers\.(\d+)\.(.+)", key)
        if m:
            stacked.setdefault(m.group(2), []).append(value)
        else:
            out[key] = value
    out.update({f"model.decoder.layers.{name}": torch.stack(values) for name, values in stacked.items()})
    return out


# TP split dimension of each global tensor (after the layer dimension of stacked ones); None: replicated
def _tp_dim(key: str):
    if re.search(r"linear_(qkv|fc1)\.(weight|bias)$|word_embeddings|output_layer", key):
        return 0
    if re.search(r"linear_(proj|fc2)\.weight$", key):
        return 1
    return None


def sharded_like_tp2_pp2(key: str, tensor: torch.Tensor) -> ShardedTensor:
    """``tensor`` as the chunks 2 TP x 2 PP ranks save: one per layer and TP piece (a gated fc1: 2 x TP pieces)."""
    stacked = key.startswith("model.decoder.layers.")
    dim = _tp_dim(key)
    n = 1 if dim is None else (4 if "linear_fc1" in key and tensor.shape[1] == 2 * 88 else 2)
    layers = range(tensor.shape[0]) if stacked else [None]
    pieces = []
    for layer in layers:
        base = tensor[layer : layer + 1] if stacked else tensor
        d = None if dim is None else dim + (1 if stacked else 0)
        parts = [base] if d is None else list(torch.chunk(base, n, dim=d))
        start = 0
        for part in parts:
            offsets = [0] * tensor.dim()
            if stacked:
                offsets[0] = layer
            if d is not None:
                offsets[d] = start
                start += part.shape[d]
            pieces.append((offsets, part.clone()))
    shards = [Shard.from_tensor_and_offsets(t, off, 0) for off, t in pieces]
    props = TensorProperties(dtype=tensor.dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    md = ShardedTensorMetadata([ShardMetadata(off, list(t.shape), "rank:0/cpu") for off, t in pieces], tensor.shape, props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, sharded_tensor_metadata=md, process_group=None)


@pytest.fixture
def process_group():
    """A one-process gloo group: ShardedTensor (several chunks held by one process) needs one to be saved."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def save_dcp(folder, state: dict, threads: int = 1) -> dict:
    """Write ``state`` with torch.distributed.checkpoint; return the files as ``model_weights/<name>`` members."""
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), thread_count=threads))
    return {f"model_weights/{p.name}": p.read_bytes() for p in folder.iterdir()}


def check_import(src, hf, model, tmp_path):
    convert(src, tmp_path / "ours", to="lmforge", progress=False)
    ours, _ = load_model(tmp_path / "ours")
    theirs = model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (imported_logits(tmp_path / "ours", ids) - hf(ids).logits).abs().max().item() < 1e-5
    convert(src, tmp_path / "hf", to="hf", progress=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("source", ["llama", "gpt2"], indirect=True)
@pytest.mark.parametrize("as_folder", [False, True])
def test_torch_dist_import_matches_hf(source, as_folder, tmp_path):
    hf, model = source
    state = mcore_global_state(model)
    assert state["model.decoder.layers.self_attention.linear_qkv.weight"].shape[0] == 4  # stacked over layers
    state["model.decoder.layers.self_attention.core_attention._extra_state/shard_0_1"] = io.BytesIO(
        pickle.dumps(_Trap(tmp_path / "unpickled.txt")))  # a byte item: must stay unread
    members = save_dcp(tmp_path / "dcp", state)
    members.update({"model_config.yaml": nemo_config(model, dist_ckpt_format="torch_dist"),
                    "abc_tokenizer.model": b"spm"})
    src = tmp_path / ("extracted" if as_folder else "m.nemo")
    if as_folder:
        src.mkdir()
    write_members(src, members, as_folder=as_folder)
    check_import(src, hf, model, tmp_path)
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"spm"
    assert not (tmp_path / "unpickled.txt").exists()


@pytest.mark.parametrize("source", ["llama", "gpt2"], indirect=True)
def test_torch_dist_chunks_of_tp2_pp2_are_reassembled(source, process_group, tmp_path):
    hf, model = source
    state = {k: sharded_like_tp2_pp2(k, v) for k, v in mcore_global_state(model).items()}
    qkv = state["model.decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.local_shards()) == 8  # 4 layers x 2 TP pieces
    members = save_dcp(tmp_path / "dcp", state, threads=2)
    assert sum(name.endswith(".distcp") for name in members) == 2  # the items are spread over two files
    md = pickle.loads(members["model_weights/.metadata"])  # the test's own file: plain pickle is fine here
    assert len(md.state_dict_metadata["model.decoder.layers.self_attention.linear_qkv.weight"].chunks) == 8
    members["model_config.yaml"] = nemo_config(model, tp=2, pp=2, dist_ckpt_format="torch_dist")
    write_members(tmp_path / "m.nemo", members)
    check_import(tmp_path / "m.nemo", hf, model, tmp_path)


@pytest.mark.parametrize("source", ["llama"], indirect=True)
def test_torch_dist_damage_is_reported(source, process_group, tmp_path):
    hf, model = source
    state = {k: sharded_like_tp2_pp2(k, v) for k, v in mcore_global_state(model).items()}
    members = save_dcp(tmp_path / "dcp", state, threads=2)
    members["model_config.yaml"] = nemo_config(model, dist_ckpt_format="torch_dist")
    # a data file lost in the copy
    lost = dict(members)
    del lost["model_weights/__0_1.distcp"]
    write_members(tmp_path / "lost.nemo", lost)
    with pytest.raises(CheckpointError, match=r"model_weights/__0_1\.distcp is missing"):
        convert(tmp_path / "lost.nemo", tmp_path / "out", to="lmforge", progress=False)
    # a chunk dropped from the index: its part of the tensor is not covered
    md = pickle.loads(members["model_weights/.metadata"])
    chunks = md.state_dict_metadata["model.output_layer.weight"].chunks
    del chunks[1]
    gap = dict(members, **{"model_weights/.metadata": pickle.dumps(md)})
    write_members(tmp_path / "gap.nemo", gap)
    with pytest.raises(CheckpointError, match=r"chunks of model\.output_layer\.weight cover 2304 of 4608 elements"):
        convert(tmp_path / "gap.nemo", tmp_path / "out", to="lmforge", progress=False)
    # a truncated data file
    short = dict(members, **{"model_weights/__0_0.distcp": members["model_weights/__0_0.distcp"][:100]})
    write_members(tmp_path / "short.nemo", short)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp ends before the item"):
        convert(tmp_path / "short.nemo", tmp_path / "out", to="lmforge", progress=False)
    # the stacked layer dimension disagrees with num_layers
    wrong = dict(members, **{"model_config.yaml": nemo_config(model, num_layers=3)})
    write_members(tmp_path / "wrong.nemo", wrong)
    with pytest.raises(CheckpointError, match=r"stacks \(4,\) layers but model_config\.yaml says num_layers=3"):
        convert(tmp_path / "wrong.nemo", tmp_path / "out", to="lmforge", progress=False)
    assert not (tmp_path / "out").exists()
