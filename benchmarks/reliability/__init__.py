"""`opd bench reliability` (`run.py`): does training survive kill -9 and a teacher server that dies, and does
`opd serve` survive bad input and load?"""
