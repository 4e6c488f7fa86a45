"""How much does the committed text encoder's output depend on word order? For each "is the X left of / above the Y?"
question: the distance between a shape word's output as subject and as object, and between the answer slot's output
for the two orders. Run from the repository root."""
import sys, torch, random
sys.path.insert(0,"tools/train"); sys.path.insert(0,"tools/reference")
import shapes, train
from transformers import T5EncoderModel
torch.set_num_threads(1)
tok = train.build_tokenizer()
t5 = T5EncoderModel.from_pretrained("models/ddit-shapes/text_encoder").eval()
mask = tok.token_to_id("<extra_id_0>")
X_ans, X_shape, y = [], [], []
pairs = [(a,b) for a in shapes.SHAPES for b in shapes.SHAPES if a!=b]
for rel in ["left of","above"]:
    for a,b in pairs:
        p = tok.encode(shapes.VQA_TEMPLATE.format(question=f"is the {a} {rel} the {b}?")).ids[:-1]
        ids = torch.tensor([p + [mask]*(train.VQA_LEN-len(p))])
        with torch.no_grad(): h = t5(input_ids=ids).last_hidden_state[0]
        ia = p.index(tok.token_to_id(a)); ib = p.index(tok.token_to_id(b))
        X_ans.append(h[len(p)]); y.append(shapes.SHAPES.index(a))
        X_shape.append((h[ia], h[ib]))
# difference of subject vs object token representation for same shape word
for s in shapes.SHAPES:
    subj = [X_shape[i][0] for i,(a,b) in enumerate(pairs*2) if a==s]
    obj = [X_shape[i][1] for i,(a,b) in enumerate(pairs*2) if b==s]
    S = torch.stack(subj).mean(0); O = torch.stack(obj).mean(0)
    print(s, "subj-obj diff norm", round((S-O).norm().item(),3), "token norm", round(S.norm().item(),3))
A = torch.stack(X_ans)
print("answer-slot spread across the 12 questions:", round((A - A.mean(0)).norm(dim=1).mean().item(),4), "norm", round(A.norm(dim=1).mean().item(),3))
# swap pairs difference at answer slot
for k,(a,b) in enumerate(pairs):
    j = pairs.index((b,a))
    print(a,b,"ans-slot diff vs swapped", round((A[k]-A[j]).norm().item(),4))
