import align


class Keyword(align.Fields):
    keyword: str  # a column of every prompt record, validated like the core's own fields


def contains_keyword(completions, keyword):
    pairs = zip(completions, keyword, strict=True)
    return [float(k in align.completion_text(c)) for c, k in pairs]


@align.hookimpl
def align_register_rewards(register):
    register(align.Reward("keyword", "1 if it has the keyword", contains_keyword, Keyword))
