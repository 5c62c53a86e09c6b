"""`--dtype` reaches the models the services load: `crossdraft serve verifier|drafter|all --dtype bfloat16`
loads bfloat16 weights (on the CPU here), GetInfo and the start-up log say so, and the output through the
services is identical to the in-process engine loaded in that dtype: "identical to the target alone"
holds against the target in the dtype it is served in, whatever the device's default."""
from __future__ import annotations

import grpc
import pytest
import torch
from test_gateway import Procs
from test_services import save_model

from crossdraft.client import Client
from crossdraft.engine import Engine
from crossdraft.sampling import SamplingParams
from crossdraft.v1 import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from drafter_service.client import run_session

PROMPT = "class Parser:\n    def get_value(self"
N = 24


@pytest.fixture(scope="module")
def served(trained_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    dirs = {"target": save_model(trained_models["bpe"], "bpe", root / "target"),
            "spm": save_model(trained_models["spm"], "spm", root / "drafter-spm")}
    procs = Procs(root)
    bf16 = ["--dtype", "bfloat16"]
    try:
        addr = {"verifier": procs.start("verifier", "verifier", dirs["target"], bf16),
                "drafter": procs.start("drafter", "drafter", dirs["spm"], bf16),
                "all": procs.start_cmd("all", ["all", "--target", str(dirs["target"]), "--drafter", str(dirs["spm"]),
                                               "--threads", "1", *bf16])}
        procs.wait_serving(addr)
        yield dict(addr, dirs=dirs, procs=procs)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def engine_bf16(served):
    d = served["dirs"]
    return Engine.load(str(d["target"]), str(d["spm"]), device="cpu", dtype=torch.bfloat16)


def test_get_info_reports_the_dtype_asked_for(served):
    with grpc.insecure_channel(served["verifier"]) as ch:
        stub = verifier_pb2_grpc.VerifierServiceStub(ch)
        info = stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5)
    assert (info.device, info.dtype) == ("cpu", "bfloat16")  # the CPU's default is float32
    with grpc.insecure_channel(served["drafter"]) as ch:
        info = drafter_pb2_grpc.DrafterServiceStub(ch).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5)
    assert (info.device, info.dtype) == ("cpu", "bfloat16")


def test_serve_all_loads_both_models_in_the_dtype_asked_for(served):
    log = (served["procs"].log_dir / "all.log").read_text(errors="replace")
    assert "loaded target: bfloat16 on cpu" in log and "loaded drafter-spm: bfloat16 on cpu" in log, log


def test_bench_distributed_cluster_loads_the_dtype_asked_for(served):
    """`bench --distributed --dtype X` compares the engine in X with services started by LocalCluster,
    which must load X too."""
    from crossdraft.local_cluster import LocalCluster

    d = served["dirs"]
    with LocalCluster(str(d["target"]), [str(d["spm"])], redis=False, dtype="bfloat16") as cluster:
        with grpc.insecure_channel(cluster.verifier) as ch:
            stub = verifier_pb2_grpc.VerifierServiceStub(ch)
            assert stub.GetInfo(verifier_pb2.VerifierServiceGetInfoRequest(), timeout=5).dtype == "bfloat16"
        with grpc.insecure_channel(cluster.drafters["drafter-spm"]) as ch:
            info = drafter_pb2_grpc.DrafterServiceStub(ch).GetInfo(drafter_pb2.DrafterServiceGetInfoRequest(), timeout=5)
        assert info.dtype == "bfloat16"


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=5)], ids=["greedy", "T=1"])
def test_output_identical_to_the_engine_in_that_dtype(served, engine_bf16, params):
    assert engine_bf16.drafter_runner.dtype == torch.bfloat16
    ref = engine_bf16.generate(PROMPT, N, params, "slem")
    ids, text, _ = run_session(served["drafter"], served["verifier"], PROMPT, N, params, "slem", timeout=60)
    assert (ids, text) == (ref.ids, ref.text)
    with Client(served["all"], timeout=60) as c:
        out = c.generate(PROMPT, N, params.temperature, params.seed, "slem")
    assert (out["ids"], out["text"]) == (ref.ids, ref.text)
