from lib.tokenizer import MAX_LENGTH, build_clip_tokenizer


def test_vocabulary_matches_openai_clip():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    # ids of openai/clip-vit-large-patch14
    assert tok("a photo of a van gogh painting").input_ids == [49406, 320, 1125, 539, 320, 2451, 19697, 3086, 49407]
    assert tok.model_max_length == MAX_LENGTH == 77


def test_padding_token_choice_and_round_trip(tmp_path):
    tok = build_clip_tokenizer(pad_token="!")
    ids = tok("cat", padding="max_length", max_length=8).input_ids
    assert tok.pad_token == "!" and ids[3:] == [0] * 5  # "!" is id 0 (OpenCLIP's padding for SD 2.x), not "!</w>"
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("snoopy r2d2").input_ids == tok("snoopy r2d2").input_ids
