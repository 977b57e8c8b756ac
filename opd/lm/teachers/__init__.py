"""Teachers: the `Teacher` protocol, a local Hugging Face teacher, several teachers routed by a data column
(`--teachers`), and the student's own starting weights (`--teacher self`).
"""
