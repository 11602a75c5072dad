from prunekit.cli import run

run()
