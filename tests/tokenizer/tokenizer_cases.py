"""What the tokenizer tests feed rz and llama.cpp: a hand-written corpus, seeded random text,
and the comparison of both tokenizers over them."""

import random

from rz.errors import TokenizerError

_PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "Ça va? Déjà vu, naïve café, résumé — señor Müller aß Straße.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我能吞下玻璃而不伤身体。你好，世界！",
    "いろはにほへと ちりぬるを カタカナ 漢字かな交じり文",
    "다람쥐 헌 쳇바퀴에 타고파. 안녕하세요!",
    "العربية لغة جميلة، أليس كذلك؟ ١٢٣٤٥",
    "עברית: שלום עולם",
    "हिन्दी में लिखा गया वाक्य। प्रधानमंत्री विश्वविद्यालय",
    "বাংলা ভাষা পাকিস্তানের সেনাবাহিনীর",
    "ภาษาไทยเป็นภาษาที่ไม่มีช่องว่างระหว่างคำ",
    "Tiếng Việt có dấu: Nguyễn Thị Minh Khai",
    "İstanbul'da ılık bir gün; Iğdır ve ŞEHİR",
    "Zażółć gęślą jaźń",
]

_EMOJI = [
    "🤖👍🏽 🇫🇷🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 1️⃣ ❤️",
    "emoji🙂in🙃words😀",
    "🧑🏿‍🚀🧑‍💻",
    "a\u200db\u200cc\ufe0fd",
]

_CODE = [
    "def add(a, b):\n\treturn a + b\n\n\nclass Foo:\n    def __init__(self):\n        self.x = 1\n",
    'int main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": true}}',
    "<table><tr><td>cell</td></tr></table> <div class='x'>text</div>",
    "# Title\n\n- item one\n- item two\n\n```python\nprint('hi')\n```\n",
    "x = y**2 + z//3 - w%4; a != b && c || !d; i += 1; ptr->field; ::ns::name",
    "SELECT * FROM users WHERE id = 123 AND name LIKE '%bob%';",
    "https://example.com/path?query=1&b=2#frag user@example.org",
    "$ ls -la | grep '^d' > out.txt 2>&1",
]

_WHITESPACE = [
    " ", "  ", "   ", "    ", " " * 17, " " * 40, "\t", "\t\t\t", "\n", "\n\n", "\n" * 35,
    "\r\n", "a\r\nb\r\n\r\nc", " \n \n ", "a \n b", "trailing   ", "   leading", "mid   dle",
    "tab\tsep\tvalues", "\u00a0nbsp\u00a0", "ideographic\u3000space", "line\u2028sep\u2029para",
    "vt\x0bff\x0cnel\x85", " \t \n \r ", "word \n\n\n\tword", "x  \n  y", "\n\n  \n\t\n",
]  # fmt: skip

_NUMBERS = [
    "1", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
    "3.14159", "1,000,000", "-42", "+7", "0x1F", "1e-10", "2024-01-01", "v1.2.3",
    "٣٤٥", "²³", "Ⅻ", "½ ¾", "１２３", "42nd 3rd 1st",
]  # fmt: skip

_CONTRACTIONS = [
    "I'm you're we've they'll he'd it's don't can't won't",
    "I'M YOU'RE WE'VE THEY'LL HE'D IT'S DON'T",
    "'s 't 're 've 'm 'll 'd", "'S 'T 'RE 'VE 'M 'LL 'D", "''''", "'", "rock 'n' roll",
    "the cat's toy", "O'Brien's", "l'amour d'été",
]  # fmt: skip

_SPECIAL_LOOKING = [
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>", "<s>", "</s>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
    "[multimodal]", "<start_of_image>", "<unused0>", "<unused6241>", "<0x41>", "<|eot_id|>",
    "<reponame>", "<filename>", "<start_of", "<<start_of_turn>>", "<start_of_turn><end_of_turn>",
    "x<|im_start|>y", "<|im_start|><|im_start|>", "text</s>more", "<bos>Hello",
    " <start_of_turn> spaced </s> ", "<|im_end|>\n", "<table>", "</code>",
]  # fmt: skip

_EDGE = [
    "", "a", "A", ".", "▁", "▁▁x", "x▁y", "Ġ", "Ċ", "\x00", "a\x00b", "\x7f", "\x1f",
    "\ufeffBOM", "\ufffd", "\U0010fffd", "\u0378", "\U000e0001", "\u0301", "e\u0301",
    "\u200d", "\ue000", "\U00031350\U00031351", "\u2ffc\u31ef", "\U0001f600", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "ﬁ ﬂ", "Å Å", "…", "—–-", "«»„“”‘’", "¿¡", "©®™", "∑∫√∞≠", "→⇒↔",
]  # fmt: skip

_LONG = [
    " ".join(_PROSE) * 3,
    "word " * 300,
    "9" * 500,
    "汉字" * 300,
    "a" * 1000,
    " " * 1000 + "x",
]

CORPUS = _PROSE + _EMOJI + _CODE + _WHITESPACE + _NUMBERS + _CONTRACTIONS + _SPECIAL_LOOKING + _EDGE + _LONG

_FUZZ_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\u00a0\u3000\u2028\x0b\x85",
    "àéîõüßçñøåÆŒ",
    "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВ",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "的一是不了人我在有他这为之大来以个中上们",
    "あいうえおかきくけこアイウエオ",
    "가나다라마바사아자차카타파하",
    "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "कखगघङचछजझञािीुूेैोौ्ं",
    "กขคงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮะาำิีึืุู่้๊๋",
    "😀😂🤖👍🏽❤️🇫🇷",
    "\u200d\u200c\ufe0f\u0301\u0308",
    "\ue000\u0378\U00031350\u2ffc",
]
_FUZZ_FRAGMENTS = ["'s", "'t", "'re", "'ll", "'D", "  ", "\r\n", "\n\n", "<start_of_turn>", "<|im_end|>", "</s>",
                   "<|endoftext|>", "▁", "👨‍👩‍👧", "123456"]  # fmt: skip


def fuzz_texts(count: int, seed: int) -> list[str]:
    """count random strings mixing scripts, whitespace, punctuation and special-token text."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 24)):
            if rng.random() < 0.15:
                pieces.append(rng.choice(_FUZZ_FRAGMENTS))
            else:
                pool = rng.choice(_FUZZ_POOLS)
                pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        texts.append("".join(pieces))
    return texts


def encoding_mismatches(model, texts: list[str]) -> list[str]:
    """Every (text, add_bos, special) for which rz's ids differ from llama.cpp's, described."""
    reference = model.reference
    failures = []
    has_bos = reference.bos_id >= 0
    for text in texts:
        for special in (False, True):
            with_specials = reference.tokenize(text, add_special=True, special=special)
            without = reference.tokenize(text, add_special=False, special=special)
            forced_bos = with_specials if reference.add_bos else [reference.bos_id, *with_specials]
            cases = ((None, with_specials), (False, without), (True, forced_bos if has_bos else "TokenizerError"))
            for add_bos, expected in cases:
                try:
                    got = model.rz.encode(text, add_bos=add_bos, special=special)
                except TokenizerError:
                    got = "TokenizerError"
                if got != expected:
                    failures.append(
                        f"{model.name} text={text!r} add_bos={add_bos} special={special}:\n"
                        f"  rz        {got}\n  llama.cpp {expected}"
                    )
    return failures
