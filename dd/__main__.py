from dd.cli import run

run()
