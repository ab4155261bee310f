from thresher.cli import app

app(prog_name="thresher")
