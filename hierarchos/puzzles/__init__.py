"""The puzzle tasks package: Sudoku generation, solving, augmentation and the dataset files.

Pure numpy and Python: nothing here imports torch or the model, so a generator worker
process starts fast and the data can be built on any machine.
"""
