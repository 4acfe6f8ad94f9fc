"""The official SDKs' async clients, made on first use and closed once, for the teachers and the
batch providers alike. The SDK's own retries are off: dispatch.py retries, so one policy (and one
count of attempts) covers every provider."""

from __future__ import annotations

from typing import Any


class SdkClient:
    def __init__(self, provider: str, api_key: str, base_url: str | None, timeout_s: float) -> None:
        if provider not in ("openai", "anthropic"):
            raise ValueError(f"no SDK client for provider {provider!r}")
        self.provider = provider
        self.api_key = api_key  # for scrubbing error text; kept off every repr, log and message
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._client: Any = None

    def __repr__(self) -> str:
        return f"SdkClient({self.provider!r})"

    def get(self) -> Any:
        if self._client is None:
            if self.provider == "anthropic":
                from anthropic import AsyncAnthropic as make
            else:
                from openai import AsyncOpenAI as make  # type: ignore[assignment]
            self._client = make(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
