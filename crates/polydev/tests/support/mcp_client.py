"""An MCP client from PyPI (the `mcp` package) against `polydev mcp` on
stdio, for crates/polydev/tests/it/clis.rs: reads {bin, server, token,
providers, env} as JSON on stdin, initialises, calls get_perspectives and
prints what it saw as JSON. The Rust test owns the assertions."""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, snake: str, camel: str):
    """The `mcp` package names fields in snake_case from 2.0 on."""
    return getattr(obj, snake) if hasattr(obj, snake) else getattr(obj, camel)


async def main() -> None:
    args = json.load(sys.stdin)
    env = dict(os.environ)
    env.update(args.get("env", {}))
    params = StdioServerParameters(
        command=args["bin"],
        args=["mcp", "--server", args["server"], "--token", args["token"]],
        env=env,
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool(
                "get_perspectives",
                {"prompt": "hello from python", "providers": args["providers"]},
            )
            print(
                json.dumps(
                    {
                        "serverName": field(init, "server_info", "serverInfo").name,
                        "serverVersion": field(init, "server_info", "serverInfo").version,
                        "tools": [t.name for t in tools.tools],
                        "isError": bool(field(result, "is_error", "isError")),
                        "text": "".join(
                            getattr(c, "text", "") for c in result.content
                        ),
                    }
                )
            )


asyncio.run(main())
