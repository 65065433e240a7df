"""TuneBench's Textual workbench; `tunebench.tui.app.run(workspace, model)` opens it."""
