"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Compare in fp64; infinities must match exactly (lse = -inf rows) and nothing may be NaN."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: -inf pattern differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
