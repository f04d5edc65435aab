"""A client in another language: Python stubs generated from proto/ stream a completion from a
running Tandem router, and a bad request gets INVALID_ARGUMENT.

Usage: python client.py HOST:PORT   (stubs are generated into a temporary folder)
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate_stubs(out):
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            "-I", os.path.join(ROOT, "proto"),
            "--python_out", out, "--grpc_python_out", out,
            "tandem/v1/inference.proto",
        ],
        check=True,
    )
    sys.path.insert(0, out)


def main(router):
    with tempfile.TemporaryDirectory() as out:
        generate_stubs(out)
        import grpc
        from tandem.v1 import inference_pb2 as pb
        from tandem.v1 import inference_pb2_grpc as rpc

        with grpc.insecure_channel(router) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = rpc.InferenceStub(channel)
            info = stub.ModelInfo(pb.ModelInfoRequest())
            request = pb.GenerateRequest(
                text="Hello from Python",
                max_tokens=8,
                ignore_eos=True,
                logprobs=True,
                sampling=pb.SamplingParams(temperature=0.0),
            )
            tokens, final = [], None
            for response in stub.Generate(request, timeout=60):
                kind = response.WhichOneof("kind")
                if kind == "chunk":
                    tokens.extend(response.chunk.token_ids)
                    assert len(response.chunk.logprobs) == len(response.chunk.token_ids)
                elif kind == "final":
                    final = response.final
                else:
                    raise AssertionError(f"unexpected {kind}: {response}")
            assert final is not None, "no final message"
            assert len(tokens) == 8, tokens
            assert final.usage.completion_tokens == 8, final
            assert final.finish_reason == pb.FINISH_REASON_LENGTH, final
            assert all(0 <= t < info.vocab_size for t in tokens), tokens

            bad = pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=2.0))
            try:
                list(stub.Generate(bad, timeout=30))
                raise AssertionError("top_p=2 was accepted")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
                assert "top_p" in error.details(), error.details()
    print(f"python client: {len(tokens)} tokens from {info.model} via {router}: ok")


if __name__ == "__main__":
    main(sys.argv[1])
