"""Tool calls on /v1/chat/completions, through the official `openai` client: `tools`, `tool_choice` (auto,
none, required, a named function), `tool_calls` streamed and not, `role: "tool"` results sent back."""

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_export(tmp_path_factory):
    """A tiny Llama with room for a tool listing (1,024 positions; the shared tiny model has 256), exported
    adapter-aware as a bare base."""
    from conftest import save_checkpoint

    from qlora_rt.config import ExportConfig
    from qlora_rt.export.exporter import export

    d = tmp_path_factory.mktemp("tools")
    export(ExportConfig(model=str(save_checkpoint(d / "tiny", max_position_embeddings=1024)), out=str(d / "onnx"),
                        quant="nf4", weights="fp32"))
    return d / "onnx"


@pytest.fixture(scope="module")
def client(tools_export):
    from conftest import serve_in_thread

    from qlora_rt.server.app import create_app

    port, stop = serve_in_thread(create_app(tools_export, max_batch=2, served_model_name="base"))
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    stop()


def _call_args(call, name):
    assert call.type == "function" and call.function.name == name and call.id.startswith("call_")
    return json.loads(call.function.arguments)


def test_required_makes_a_call_whose_arguments_fit_the_schema(client):
    for temperature in (0, 1):
        r = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                           max_tokens=200, temperature=temperature, seed=3)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        (call,) = choice.message.tool_calls
        args = _call_args(call, call.function.name)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Oslo", "Lima") and args["unit"] in ("C", "F")
        else:
            assert args == {}


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER, CLOCK], max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert _call_args(r.choices[0].message.tool_calls[0], "get_time") == {}


def test_a_streamed_call_arrives_as_tool_call_deltas(client):
    whole = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200, temperature=0)
    chunks = list(client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=200, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == json.loads(whole.choices[0].message.tool_calls[0]
                                                                  .function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_auto_answers_in_text_or_with_a_valid_call_and_none_in_text(client):
    for seed in (0, 1, 2):
        r = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], max_tokens=40, seed=seed)
        m = r.choices[0].message
        if m.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls" and _call_args(m.tool_calls[0], "get_weather")
        else:
            assert r.choices[0].finish_reason in ("stop", "length") and "<tool_call>" not in (m.content or "")
    r = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_goes_back_and_is_answered(client):
    first = client.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21})}]
    r = client.chat.completions.create(model="base", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    alone = client.chat.completions.create(model="base", messages=ASK, max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result are in the prompt


def test_parameters_with_defs_and_refs_as_pydantic_writes_them(client):
    """A schema whose `$ref`s point into its own `$defs` (Pydantic's output) or at itself ("#", a recursive tree)
    is held under the call's schema with its pointers kept meaning what they meant."""
    class_city = {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"City": {"type": "object", "properties": {"name": {"enum": ["Paris", "Oslo"]}},
                           "required": ["name"], "additionalProperties": False}},
        "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
        "additionalProperties": False}}}
    tree = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"leaf": {"enum": [1, 2]}, "child": {"$ref": "#"}}, "required": ["leaf"],
        "additionalProperties": False}}}
    for tool, check in ((class_city, lambda a: a["city"]["name"] in ("Paris", "Oslo") and set(a) == {"city"}),
                        (tree, lambda a: a["leaf"] in (1, 2))):
        r = client.chat.completions.create(model="base", messages=ASK, tools=[tool], tool_choice="required",
                                           max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        assert check(_call_args(r.choices[0].message.tool_calls[0], tool["function"]["name"]))
    only_itself = {"type": "function", "function": {"name": "loop", "parameters": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError, match="refer only to themselves"):
        client.chat.completions.create(model="base", messages=ASK, tools=[only_itself], tool_choice="required",
                                       max_tokens=8)


def test_bad_tool_requests_are_400s_naming_the_field(client):
    bad = [dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
           dict(tool_choice="required"),
           dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
           dict(tools=[{"type": "function", "function": {"name": "has space"}}])]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="base", messages=ASK, max_tokens=4, **extra)


def test_the_prompt_carries_the_tools_as_the_template_takes_them(tools_export):
    """A template that names `tools` gets them (and earlier calls as objects); one that does not gets the
    default system message, calls written as <tool_call> text and results as <tool_response>."""
    from qlora_rt.runtime import Model
    from qlora_rt.server.protocol import ChatBody
    from qlora_rt.server.tools import Tools

    body = ChatBody(model="a", tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"}])
    tools = Tools(body)
    plain, extra = tools.messages(body.messages, template_takes_tools=False)
    assert extra == {} and plain[0]["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert '"name":"get_weather"' in plain[0]["content"]
    assert plain[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' \
                                  "</tool_call>"
    assert plain[3] == {"role": "tool", "content": "<tool_response>21</tool_response>"}
    native, extra = tools.messages(body.messages, template_takes_tools=True)
    assert extra["tools"][0]["function"]["name"] == "get_weather"
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "C"}
    assert native[3]["tool_call_id"] == "c1"
    assert not Model(tools_export).template_takes_tools  # the tiny model's ChatML template


def test_auto_lets_text_through_and_holds_a_started_call_to_the_schema(tools_export):
    from qlora_rt.runtime.constrained import Grammars
    from qlora_rt.runtime.decoder import Model
    from qlora_rt.server.protocol import ChatBody
    from qlora_rt.server.tools import Tools

    m = Model(tools_export)
    grammar = Tools(ChatBody(model="base", messages=ASK, tools=[WEATHER])).grammar()
    grammars = Grammars(tools_export, m.meta.vocab, sorted(m.eos))

    def accepts(text):
        c = grammars.lark(grammar)
        return all(c.matcher.consume_token(t) for t in m.tokenizer.encode(text, add_special_tokens=False).ids)
    assert accepts("It is sunny in Paris.")
    assert accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}</tool_call>')
    assert not accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"')
    assert not accepts("<tool_call>sunny")
