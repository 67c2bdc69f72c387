"""Serving mode against a fake of rz's gRPC service: token ids sent, coalesced chunks counted by their tokens."""

import json
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rz.bench.cli import main
from rz.bench.environment import model_facts
from rz.bench.workloads import model_tokenizer
from rz.api.v1 import inference_pb2 as pb
from rz.api.v1 import inference_pb2_grpc as pb_grpc


class FakeInference(pb_grpc.InferenceServiceServicer):
    """Streams max_tokens tokens, two per message (as a coalescing server does), and says what it serves."""

    def __init__(self, model_path, parameters):
        self.model_path = model_path
        self.parameters = parameters
        self.prompts = []

    def Generate(self, request, context):
        self.prompts.append(list(request.prompt_ids))
        n = request.options.max_tokens
        for start in range(0, n, 2):
            ids = list(range(start, min(start + 2, n)))
            last = start + 2 >= n
            yield pb.GenerateResponse(text="x" * len(ids), token_ids=ids,
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED)

    def Tokenize(self, request, context):
        return pb.TokenizeResponse(token_ids=model_tokenizer(self.model_path).encode(request.text, add_bos=False))

    def ModelInfo(self, request, context):
        facts = model_facts(self.model_path)
        return pb.ModelInfoResponse(name="fake", architecture=facts["architecture"], parameters=self.parameters)


@pytest.fixture
def fake_rz_server(smollm2_path):
    def start(parameters=None):
        service = FakeInference(smollm2_path, parameters or model_facts(smollm2_path)["parameters"])
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_InferenceServiceServicer_to_server(service, server)
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"grpc://127.0.0.1:{port}", service
    servers = []
    yield start
    for server in servers:
        server.stop(grace=None)


def test_serving_rz_over_grpc(fake_rz_server, smollm2_path, tmp_path, capsys):
    url, service = fake_rz_server()
    path = tmp_path / "serving.json"
    code = main(["serve", "--url", url, "--model", str(smollm2_path), "--concurrency", "2", "--requests", "4",
                 "--prompt-tokens", "10", "--max-tokens", "5", "--json", str(path), "--no-history", "--quiet"])
    assert code == 0, capsys.readouterr()
    figures = json.loads(path.read_text())["serving"]
    assert figures["engine"] == "rz-grpc" and figures["completed"] == 4
    # Three messages of 2, 2 and 1 tokens: five tokens each, two gaps between messages.
    assert figures["output_token_throughput"] == pytest.approx(5 * figures["request_throughput"])
    assert figures["itl_s"]["n"] == 4 * 2
    assert all(len(prompt) == 10 for prompt in service.prompts) and len({tuple(p) for p in service.prompts}) == 4


def test_a_server_with_another_model_fails_preflight(fake_rz_server, smollm2_path, capsys):
    url, _ = fake_rz_server(parameters=7)
    code = main(["serve", "--url", url, "--model", str(smollm2_path), "--concurrency", "1", "--quiet", "--no-history"])
    err = capsys.readouterr().err
    assert code == 2 and "serves fake (llama, 7 parameters), not SmolLM2" in err
