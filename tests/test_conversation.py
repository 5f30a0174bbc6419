"""What a chat is routed on: the last user turn after a bounded window of its conversation."""

from mixllm.service.api_models import ChatMessage, conversation_text


def _messages(*pairs):
    return [ChatMessage(role=role, content=content) for role, content in pairs]


def test_the_last_turn_comes_last_after_the_newest_context_that_fits():
    messages = _messages(("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"),
                         ("user", [{"type": "text", "text": "And times 3?"}]), ("assistant", "12"),
                         ("user", "Explain."))
    assert conversation_text(messages, 2, 1000) == "user: And times 3?\nassistant: 12\nExplain."
    assert conversation_text(messages, 10, 1000).startswith("system: Be brief.\nuser: What is 2+2?")
    assert conversation_text(messages, 0, 1000) == "Explain.", "no window: the last user turn alone"
    cut = conversation_text(messages, 10, 20)
    assert cut == "imes 3?\nassistant: 12\nExplain.", "the oldest context is cut first, to 20 characters"


def test_the_last_user_turn_is_kept_whole_and_later_messages_are_not_routed():
    long_turn = "x" * 500
    messages = _messages(("user", "earlier"), ("user", long_turn), ("assistant", "an answer not yet read"))
    text = conversation_text(messages, 4, 10)
    assert text.endswith(long_turn) and "an answer" not in text and len(text) == 10 + 1 + 500
    assert conversation_text(_messages(("assistant", "hello")), 4, 100) is None


def test_a_session_is_sticky_unless_session_sticky_is_false():
    """With session.sticky false a conversation keeps its session key (its turns still count as
    one session) but is routed afresh each turn: no LLM is read back for it."""
    from types import SimpleNamespace

    from mixllm.config import config_from_dict
    from mixllm.service.api_models import ChatRequest
    from mixllm.service.proxy import ChatProxy

    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], metadata={"session_id": "s-1"})
    no_header = SimpleNamespace(headers={})
    proxy = ChatProxy()
    proxy.sessions = SimpleNamespace(llm_of=lambda key: "strong")
    proxy.config = config_from_dict({})
    key, llm = proxy._session(request, no_header, None)
    assert key and llm == "strong"
    proxy.config = config_from_dict({"session": {"sticky": False}})
    assert proxy._session(request, no_header, None) == (key, None)
    plain = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    assert proxy._session(plain, no_header, None) == (None, None), "no session id: no session"
