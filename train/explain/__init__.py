"""Where does the model look: heatmaps, a shortcut audit and the explanation report.

`maps` computes the heatmaps, `audit` the numbers, `report` the Markdown, `run` puts them together
(`write_explanations` for `train.evaluate --explain`, `run_explain` for the standalone report), and
`__main__` is the `python -m train.explain` command. Nothing is imported here, so importing a
submodule stays cheap.
"""
