from opd.tasks import get_task
from opd.tasks.prompts import format_prompt, prompt_token_ids
from opd.tasks.tokenizer import build_tokenizer

TASK = get_task("arithmetic")
TEMPLATE = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} {% endif %}"


def test_format_prompt_uses_a_chat_template_only_when_there_is_one():
    tok = build_tokenizer(TASK)
    assert format_prompt(tok, "1+2=") == "1+2="
    tok.chat_template = TEMPLATE
    assert format_prompt(tok, "1+2=") == "<bos>1+2= "


def test_prompt_token_ids_are_the_formatted_prompts_tokens():
    tok = build_tokenizer(TASK)
    # one id per character; our tokenizer adds no special tokens of its own
    assert prompt_token_ids(tok, ["1+2=", "34*5="]) == [[7, 5, 8, 16], [9, 10, 3, 11, 16]]
    tok.chat_template = TEMPLATE
    # the template writes <bos> (id 1) itself, and the generation prompt's space (id 4)
    assert prompt_token_ids(tok, ["1+2="]) == [[1, 7, 5, 8, 16, 4]]
