"""The torchvision import guard (model/tv_guard.py): works here, and is a no-op where not needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_py(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, REPO) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def fake_torchvision(root: Path, body: str) -> Path:
    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    return root


def test_guard_makes_timm_and_transforms_import() -> None:
    proc = run_py(
        """
        import model  # imports the guard first
        import timm, torch, torchvision
        from torchvision import transforms
        from model import tv_guard
        t = transforms.Compose([transforms.Resize(8), transforms.CenterCrop(8)])
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3)
        print(tv_guard.STATUS, tuple(vit(torch.zeros(1, 3, 16, 16)).shape))
        """
    )
    assert proc.returncode == 0, proc.stderr
    status, shape = proc.stdout.split(maxsplit=1)
    assert status in {"native", "patched"}
    assert shape.strip() == "(1, 3)"


def test_guard_is_noop_when_torchvision_imports_natively(tmp_path: Path) -> None:
    root = fake_torchvision(tmp_path, "__version__ = 'native-fake'\n")
    proc = run_py(
        """
        from model import tv_guard
        import torchvision
        print(tv_guard.STATUS, tv_guard._fragment is None, torchvision.__version__)
        """,
        extra_path=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["native", "True", "native-fake"]


def test_guard_reraises_unrelated_errors(tmp_path: Path) -> None:
    root = fake_torchvision(tmp_path, "raise RuntimeError('some other torchvision failure')\n")
    proc = run_py("import model.tv_guard\n", extra_path=root)
    assert proc.returncode != 0
    assert "some other torchvision failure" in proc.stderr


def test_guard_patches_exactly_the_missing_op_failure(tmp_path: Path) -> None:
    # A stand-in for the CUDA wheel: fails the way torchvision 0.28 does until the schema exists.
    root = fake_torchvision(
        tmp_path,
        """
        import torch
        try:
            torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        except RuntimeError:
            raise RuntimeError("operator torchvision::nms does not exist") from None
        __version__ = "cuda-fake"
        """,
    )
    proc = run_py(
        """
        from model import tv_guard
        import torchvision
        print(tv_guard.STATUS, torchvision.__version__)
        """,
        extra_path=root,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["patched", "cuda-fake"]


def test_guard_reports_absent() -> None:
    proc = run_py(
        """
        import sys
        sys.modules["torchvision"] = None  # makes `import torchvision` raise ModuleNotFoundError
        from model import tv_guard
        print(tv_guard.ensure_torchvision())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "absent"
