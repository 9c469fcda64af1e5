//! The text models' WordPiece vocabulary, and the HuggingFace `tokenizer.json` that describes
//! it: the BERT pipeline (lower-casing `BertNormalizer`, `BertPreTokenizer`, WordPiece with
//! `##` continuations, `[CLS] … [SEP]` around each text). The vocabulary is fixed in code, so
//! the same build always writes the same file; any text tokenizes (a word not in the vocabulary
//! splits into pieces down to single characters, and a character outside it is `[UNK]`).

use serde_json::{Value, json};

/// The special tokens, with their ids (the first ids of the vocabulary, BERT's names).
pub const PAD: (&str, u32) = ("[PAD]", 0);
/// Unknown characters.
pub const UNK: (&str, u32) = ("[UNK]", 1);
/// The first token of every text.
pub const CLS: (&str, u32) = ("[CLS]", 2);
/// The last token of every text.
pub const SEP: (&str, u32) = ("[SEP]", 3);
/// Masked positions (unused by the demo models; kept as BERT's vocabularies have it).
pub const MASK: (&str, u32) = ("[MASK]", 4);

/// The longest text, in tokens with `[CLS]` and `[SEP]`: the size of the position table.
pub const MAX_TOKENS: usize = 512;

/// Whole words of the demo domain (customer service, video and music) and common English.
const WORDS: &str = "
the a an and or but not no yes is are was were be been am do does did done have has had
i me my mine you your we our us they them their he she it its this that these those there here
what which who whom why how when where can could will would should may might must shall
to of in on at for with from by about into over after before under again out up down off
all any some more most much many few other such only own same so than too very just now
please thanks thank hello hi hey sorry help need want like love hate get got give make let
know think see look watch listen play stop start pause resume skip next previous back open
close keep find show tell ask call talk speak say send pay buy sell cancel change update
reset remove delete add set use try work works working broken fix wrong error problem issue
account password login log sign email phone number card credit debit bank charge charged
charges bill billing invoice payment payments paid refund money price cost fee plan plans
subscription subscribe premium family basic upgrade downgrade monthly yearly month year
week day today yesterday tomorrow time again twice order orders receipt trial free renew
renewal expired failed declined failing fails failure double overcharged receipt
video videos movie movies film films show shows series episode episodes season trailer
stream streaming playback buffering buffer loading load lag slow freeze frozen crash crashes
quality resolution hd 4k blurry sound audio subtitles captions language dark screen black
download downloads downloaded offline travel flight device devices tv phone tablet laptop
computer app apps browser limit limits many too screens profile profiles kids child children
parental control controls pin lock restrict rating age mature content safe
recommend recommendation recommendations suggest suggestions feed taste like dislike boring
interesting more less similar request requests add missing available library catalog
delete deletion close remove data privacy forever permanently erase
human person agent someone support representative operator chat contact speak real live
music song songs track tracks album albums artist artists playlist playlists radio podcast
podcasts concert concerts live piano guitar jazz rock pop classical hip hop rap country
folk metal electronic dance ambient lofi blues soul indie acoustic orchestra symphony
calm relaxing relax chill sleep study focus workout running party happy sad upbeat energetic
romantic epic dramatic funny comedy action thriller horror drama documentary documentaries
nature wildlife ocean space history science cooking travel sports football soccer basketball
tennis racing cars anime animation cartoon cartoons family kids christmas holiday summer
winter night morning evening rain forest city mountain beach sea island road trip
news cat cats dog dogs animals food recipes baking guide tutorial lessons learn beginner
best top new old classic favorite popular trending latest greatest hits full hour hours
minute minutes long short mix songs sounds noise white brown soft loud quiet gentle deep
for study my order my account
";

/// Word endings kept as `##` pieces, so inflected words split into a stem and an ending.
const SUFFIXES: &str = "s es ed ing er ers est ly ion tion ment ness able ful less y ies";

/// Characters kept as pieces of their own (and as `##` continuations).
const CHARACTERS: &str = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()&/+@#$%*";

/// The vocabulary in id order: the special tokens, characters, continuations of characters,
/// word endings, then the words (each once).
pub fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = [PAD, UNK, CLS, SEP, MASK]
        .iter()
        .map(|(t, _)| (*t).to_owned())
        .collect();
    let push = |t: String, tokens: &mut Vec<String>| {
        if !tokens.contains(&t) {
            tokens.push(t);
        }
    };
    for c in CHARACTERS.chars() {
        push(c.to_string(), &mut tokens);
    }
    for c in CHARACTERS.chars().filter(char::is_ascii_alphanumeric) {
        push(format!("##{c}"), &mut tokens);
    }
    for s in SUFFIXES.split_whitespace() {
        push(format!("##{s}"), &mut tokens);
    }
    for w in WORDS.split_whitespace() {
        push(w.to_owned(), &mut tokens);
    }
    tokens
}

/// The HuggingFace `tokenizer.json` of [`vocabulary`], the BERT way (`bert-base-uncased`'s
/// pipeline): the file an operator passes to `outpost push --tokenizer`.
pub fn tokenizer_json() -> String {
    let vocab = vocabulary();
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let special = |(token, id): (&str, u32)| {
        json!({
            "id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    let piece = |(token, _): (&str, u32), type_id: u32| json!({"SpecialToken": {"id": token, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(PAD), special(UNK), special(CLS), special(SEP), special(MASK)],
        "normalizer": {
            "type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [piece(CLS, 0), sequence("A", 0), piece(SEP, 0)],
            "pair": [piece(CLS, 0), sequence("A", 0), piece(SEP, 0), sequence("B", 1), piece(SEP, 1)],
            "special_tokens": {
                CLS.0: {"id": CLS.0, "ids": [CLS.1], "tokens": [CLS.0]},
                SEP.0: {"id": SEP.0, "ids": [SEP.1], "tokens": [SEP.0]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {
            "type": "WordPiece", "unk_token": UNK.0, "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": map
        }
    });
    // A `Value` always serialises.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Writes [`tokenizer_json`] as `{dir}/{name}.tokenizer.json` (through a temporary file and a
/// rename) and returns its path.
pub fn write_tokenizer(dir: &std::path::Path, name: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.tokenizer.json"));
    let tmp = dir.join(format!(".{name}.tokenizer.json.tmp"));
    std::fs::write(&tmp, tokenizer_json())?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_starts_with_the_special_tokens_and_lists_each_token_once() {
        let v = vocabulary();
        for (t, id) in [PAD, UNK, CLS, SEP, MASK] {
            assert_eq!(v[id as usize], t);
        }
        let mut sorted = v.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len(), "a token is listed twice");
        assert!(v.len() < 1024, "{} tokens", v.len());
    }
}
