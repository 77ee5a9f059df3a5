"""The presenter's demo (docs/demo.py) runs start to end unattended in its test mode."""

import subprocess
import sys

from tests.worker import REPO


def test_the_demo_runs_every_step_on_the_tiny_model(tiny_checkpoint, tmp_path):
    from tests.tiny_model import TINY_NAME

    command = [sys.executable, "docs/demo.py", "--test", "--scratch", str(tmp_path / "demo"),
               "--base-source", str(tiny_checkpoint), "--base-name", TINY_NAME]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # What the audience sees: the job's progress, the evaluation, the activation, the three clients.
    assert "new model version: demo-job1" in out and "succeeded" in out
    assert "outputs with an unsupported claim" in out
    assert "demo-job1 is now the active version." in out and "GET /api/models: active demo-job1" in out
    assert '"model_version":{"id":2,"name":"demo-job1"}' in out
    assert "openai chat.completions:" in out and "streamed:" in out
    assert 'genapi_http_requests_total{method="POST",route="v1/chat/completions",status="200"} 2.0' in out
    assert out.rstrip().endswith("every step ran\x1b[0m")
